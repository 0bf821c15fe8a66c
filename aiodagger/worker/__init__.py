"""Workers and their processors (internal).

* :mod:`.threads`, :mod:`.aio`, :mod:`.execute` - the processors (a thread pool, the
  event loop) and what running one task means, the same in every worker.
* :mod:`.local` - worker 0, the cluster's own process, and its store.
* :mod:`.process` - a worker in a process of its own, speaking the protocol;
  :mod:`.nested` - spawning from tasks there; :mod:`.cli` - ``aiodagger worker``.

Workers know the scheduler only through :mod:`aiodagger.interfaces`, never by import.
"""
