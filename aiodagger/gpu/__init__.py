"""GPU support through cupy: ``dagger.gpu.synchronize``, ``dagger.gpu.devices``.

* :mod:`.arrays` - which values are device arrays, their size, host <-> device moves.
* :mod:`.discovery` - the devices a worker sees, and ``Cluster(gpus=...)``.
* :mod:`.waiters` - threads that wait on CUDA events for the event loop.
* :mod:`.streams` - each device's stream pool, and the events results carry.
* :mod:`.proc` - GPUProc, the processor of one device.
"""

from .api import devices, missing_reason, synchronize

__all__ = ["devices", "missing_reason", "synchronize"]
