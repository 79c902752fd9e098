"""Using a trained model: index a gallery (xbm-index), search it (xbm-search), export the model
(xbm-export) and look at the embedding (xbm-eval --projector).

    index.py      the index folder: faiss index + index.json, written atomically
    images.py     finding and decoding images; the test transform as data, replayed with PIL + numpy
    models.py     checkpoint and exported-model embedders behind one interface
    gallery.py    what xbm-index and xbm-search do
    export.py     TorchScript / ONNX export with the JSON sidecar
    projector.py  files for TensorBoard's embedding projector
    cli.py        the command lines

With an exported model, cli, gallery, models, images and index import neither the training code
(xbm.config, xbm.data, xbm.engine, xbm.modeling) nor, for ONNX models, torch (--list reads its
file with xbm.data's list parser, --split needs a checkpoint).
"""
