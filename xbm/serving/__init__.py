"""Using a trained model: index a gallery (xbm-index), search it (xbm-search), export the model
(xbm-export) and look at the embedding (xbm-eval --projector).

The modules that run an exported model (index, images, exported, search) import neither the
training code (xbm.config, xbm.data, xbm.engine, xbm.modeling) nor, for ONNX models, torch:
an exported model with its JSON sidecar is all a search service needs besides faiss.
"""
