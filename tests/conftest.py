"""Suite-wide setup: the test process caps its malloc arenas as a node does (see
``galaxy.node.cap_malloc_arenas``).  It starts and ends hundreds of threads over the run;
uncapped, their arenas reserved ~1 GiB of address space, and under a 1 GiB ``ulimit -v``
pytest itself failed with MemoryError half way through the suite."""

from galaxy.node import cap_malloc_arenas

cap_malloc_arenas()
