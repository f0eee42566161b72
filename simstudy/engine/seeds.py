"""Random streams and thread control for reproducible replicates (DESIGN §7).

One root seed. The replicate at position (condition index ``c``, replicate
``r``) draws its data from ``SeedSequence(entropy=seed, spawn_key=(c, r))``,
so results do not depend on the number of workers, the backend or the order
of execution. Methods within a replicate see the same data; a method that
asks for an ``rng`` argument gets its own stream keyed
``(c, r, METHOD_TAG, m)`` with ``m`` the method's position in the study, and
torch (when loaded in the worker) is re-seeded from the key
``(c, r, TORCH_TAG, m)`` before each method and ``(c, r, TORCH_TAG)`` before
``generate``. Because every stream is keyed by position alone, re-running a
single (condition, replicate, method) on resume reproduces it exactly.

Bitwise equality also needs the same floating-point reduction order
everywhere, so :func:`single_threaded` pins BLAS/OpenMP (threadpoolctl) and
torch to one thread while replicates run.
"""
from __future__ import annotations

import contextlib
import sys
import zlib
from collections.abc import Iterator

import numpy as np

__all__ = ["METHOD_TAG", "TORCH_TAG", "BOOTSTRAP_TAG", "measure_rng", "replicate_seed_sequence", "replicate_rng", "method_rng", "torch_seed",
           "single_threaded", "pin_torch_threads", "check_seed"]

#: Third spawn-key word of a method's own stream (chosen far above any
#: realistic number of ``rng.spawn`` children a user might create).
METHOD_TAG = 0x6D657468  # "meth"
#: Third spawn-key word of the torch seed streams.
TORCH_TAG = 0x746F7263  # "torc"
#: First spawn-key word of the bootstrap streams of summaries (keeps them apart from the replicate streams).
BOOTSTRAP_TAG = 0x626F6F74  # "boot"


def check_seed(seed) -> int:
    """Validate a root seed: a non-negative integer."""
    if isinstance(seed, np.integer):
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; allowed: an integer >= 0")
    return seed


def replicate_seed_sequence(seed: int, condition: int, replicate: int) -> np.random.SeedSequence:
    """The SeedSequence of replicate ``replicate`` of condition ``condition``.

    Parameters
    ----------
    seed : int
        Root seed of the study.
    condition, replicate : int
        Positions (0-based) of the condition in the design and of the
        replicate.

    Returns
    -------
    numpy.random.SeedSequence
        ``SeedSequence(entropy=seed, spawn_key=(condition, replicate))``.
    """
    return np.random.SeedSequence(entropy=seed, spawn_key=(int(condition), int(replicate)))


def replicate_rng(seed: int, condition: int, replicate: int) -> np.random.Generator:
    """The data generator handed to ``generate(cond, rng)`` (PCG64)."""
    return np.random.Generator(np.random.PCG64(replicate_seed_sequence(seed, condition, replicate)))


def method_rng(seed: int, condition: int, replicate: int, method_index: int) -> np.random.Generator:
    """The generator handed to a method that accepts an ``rng`` argument."""
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(int(condition), int(replicate), METHOD_TAG,
                                                         int(method_index)))
    return np.random.Generator(np.random.PCG64(ss))


def measure_rng(seed: int, condition: int, method: str, column: str, name: str) -> np.random.Generator:
    """The bootstrap stream of one summary cell (a measure of your own, :mod:`.user_measures`):
    ``SeedSequence(seed, spawn_key=(BOOTSTRAP_TAG, c, crc32(method), crc32(column), crc32(name)))``."""
    key = (BOOTSTRAP_TAG, int(condition)) + tuple(zlib.crc32(s.encode()) for s in (method, column, name))
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


def torch_seed(seed: int, condition: int, replicate: int, method_index: int | None = None) -> int:
    """63-bit integer seed for ``torch.manual_seed``.

    ``method_index=None`` gives the seed used before ``generate``; an integer
    gives the seed used before that method's ``analyse`` call.
    """
    key = (int(condition), int(replicate), TORCH_TAG)
    if method_index is not None:
        key = key + (int(method_index),)
    state = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def seed_torch_if_loaded(seed: int, condition: int, replicate: int, method_index: int | None = None,
                         force: bool = False) -> None:
    """Seed torch's global generator from :func:`torch_seed` if torch is imported (or ``force``)."""
    if force or "torch" in sys.modules:
        import torch  # lazy: the engine never needs torch itself

        torch.manual_seed(torch_seed(seed, condition, replicate, method_index))


_CONTROLLER: tuple[int, object] | None = None


def _controller():
    """A threadpoolctl controller, rebuilt when new modules (hence maybe new libraries) were imported."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    n = len(sys.modules)
    if _CONTROLLER is None or _CONTROLLER[0] != n:
        _CONTROLLER = (n, ThreadpoolController())  # ~1 ms: reads /proc/self/maps
    return _CONTROLLER[1]


class _TorchThreads:
    """Remembers torch's thread count so that it can be restored after a block."""

    def __init__(self) -> None:
        self.previous: int | None = None

    def pin(self) -> None:
        """Set torch to one thread (if torch is loaded), remembering the previous count once."""
        if "torch" not in sys.modules:
            return
        import torch

        if self.previous is None:
            self.previous = torch.get_num_threads()
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)

    def restore(self) -> None:
        if self.previous is not None and self.previous != 1:
            import torch

            torch.set_num_threads(self.previous)
        self.previous = None


_TORCH_THREADS = _TorchThreads()


def pin_torch_threads() -> None:
    """Pin torch to one thread inside a :func:`single_threaded` block (e.g. after a lazy torch import)."""
    _TORCH_THREADS.pin()


@contextlib.contextmanager
def single_threaded(force_torch: bool = False) -> Iterator[None]:
    """Pin BLAS/OpenMP pools and torch to one thread inside the block.

    Parameters
    ----------
    force_torch : bool
        Import torch even if the worker has not loaded it yet.

    Notes
    -----
    The previous limits are restored on exit, so running replicates in the
    parent process (``n_jobs=1``) leaves its thread settings unchanged.
    """
    if force_torch:
        import torch  # noqa: F401
    _TORCH_THREADS.pin()
    try:
        ctx = _controller().limit(limits=1)
    except ImportError:  # pragma: no cover - threadpoolctl ships with the scipy stack
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        _TORCH_THREADS.restore()
