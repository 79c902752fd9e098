"""One logger for the library: console plus OUTPUT_DIR/log.txt."""
import logging
import os
import sys

LOGGER_NAME = "xbm"


def setup_logger(output_dir: str | None = None, filename: str = "log.txt") -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    # Per-step lines are DEBUG: in the log file, not on the console, where tqdm shows progress.
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):  # a second run in the same process gets fresh files
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO)
    logger.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, filename))
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
