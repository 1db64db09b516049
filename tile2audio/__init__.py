"""tile2audio: label-free Tile2Vec-style audio embeddings and honest probes of them.

Stages, one module each: :mod:`~tile2audio.audio` (decode), :mod:`~tile2audio.features`
(log-mel cache), :mod:`~tile2audio.datasets` (manifests), :mod:`~tile2audio.tiles`
(segmenter), :mod:`~tile2audio.sampler` (tf.data triplets), :mod:`~tile2audio.models`,
:mod:`~tile2audio.losses`, :mod:`~tile2audio.train`, :mod:`~tile2audio.embed`,
:mod:`~tile2audio.probes`, :mod:`~tile2audio.clusters`, :mod:`~tile2audio.report`,
:mod:`~tile2audio.pipeline` (``tile2audio run``) and :mod:`~tile2audio.cli`.

TensorFlow is imported only by the stages that need it, so manifests, features, probes
and reports start fast.
"""

import logging

from .errors import Tile2AudioError

__version__ = "0.1.0"
__all__ = ["Tile2AudioError", "__version__", "embed_audio"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def embed_audio(run_dir, paths, **kwargs):
    """Embed audio files, a manifest or a cache with a trained run; see :func:`tile2audio.embed.embed`."""
    from .embed import embed

    return embed(run_dir, paths, **kwargs)


def __getattr__(name):
    # ``tile2audio.embed`` is the module; importing it on first use keeps ``import tile2audio`` light.
    if name == "embed":
        import importlib

        return importlib.import_module(f"{__name__}.embed")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
