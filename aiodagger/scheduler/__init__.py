"""The scheduler (internal): the task graph, dispatch and placement, on the cluster's loop.

* :mod:`.core` - :class:`~.core.Scheduler`: tasks, the ready heap, retries, failure
  propagation, cancellation, lineage; worker 0 through its named interface.
* :mod:`.registry` - :class:`~.registry.WorkerRegistry`: workers in other processes,
  reached only through :mod:`aiodagger.comm.protocol`.
* :mod:`.placement` - the cost model, pure functions.
* :mod:`.events` - the :class:`~.events.Instrument` event stream observers read.

It imports neither ``worker/`` nor ``memory/``: the cluster wires it to its workers.
"""
