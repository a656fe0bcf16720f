"""Multi-process runs: ``jax.distributed`` set up from flags or the environment, before any JAX use.

One ``zoo pretrain`` process runs on each host (or several on one machine); together they form
one global mesh. Each process reads only its rows of every global batch
(``zoo.data.BatchIterator``), the trainer assembles them into global arrays
(``jax.make_array_from_process_local_data``), all processes write their shards of each
checkpoint, and process 0 alone writes ``config.json`` and the metrics.

Where the settings come from, first match wins:

1. the arguments (the CLI's ``--coordinator-address``, ``--num-processes``, ``--process-id``);
2. the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID`` (each setting separately: a flag overrides its variable only);
3. none of the three: a Slurm job step with several tasks (``srun``: ``SLURM_NTASKS`` > 1) or
   an Open MPI launch (``mpirun``: ``OMPI_COMM_WORLD_SIZE`` > 1) calls
   ``jax.distributed.initialize()`` without arguments and lets JAX's own cluster detection
   fill everything in;
4. otherwise: a single process; nothing is initialised.

On a Cloud TPU pod, start the same command on every worker and pass the three settings
(process id = the worker number, coordinator = worker 0's address); JAX's TPU detection queries
the metadata server, which this module does not do on its own.

On CPU the processes need cross-process collectives: gloo over TCP (JAX's default in 0.10; set
here explicitly unless ``jax_cpu_collectives_implementation`` already names one, e.g. mpi).
A coordinator on a loopback address (``localhost``, ``127.0.0.1``, ``[::1]``) binds only there,
not to every interface, so tests on one machine stay local.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

log = logging.getLogger(__name__)

# setting -> (CLI flag, environment variable)
SETTINGS = {
    "coordinator_address": ("--coordinator-address", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("--num-processes", "JAX_NUM_PROCESSES"),
    "process_id": ("--process-id", "JAX_PROCESS_ID"),
}


class Settings(NamedTuple):
    """What ``jax.distributed.initialize`` is called with; ``auto``: no arguments (a cluster
    that JAX detects itself)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    auto: bool = False


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            environ: Mapping[str, str] | None = None) -> Settings | None:
    """The multi-process settings from arguments, else ``environ`` (default ``os.environ``);
    ``None`` for a single process. Touches no JAX state.

    Raises:
      ValueError: one line naming the flag (and its variable) when only some of the three
        settings are given, one is malformed, ``num_processes`` < 1, or ``process_id`` is
        outside ``[0, num_processes)``.
    """
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for name, (_, var) in SETTINGS.items():
        if given[name] is None and environ.get(var, "").strip():
            given[name] = environ[var].strip()
    if all(value is None for value in given.values()):
        return Settings(None, None, None, auto=True) if _cluster_detected(environ) else None
    for name in ("num_processes", "process_id"):
        given[name] = _as_int(name, given[name])
    count, index, address = given["num_processes"], given["process_id"], \
        given["coordinator_address"]
    if count is not None and count < 1:
        raise ValueError(f"{_names('num_processes')}: must be at least 1, got {count}")
    if index is not None and (index < 0 or count is not None and index >= count):
        raise ValueError(f"{_names('process_id')}: {index} is outside [0, {count or 'N'}) "
                         f"for {count or 'N'} processes")
    if count == 1:
        return None   # one process (e.g. JAX_NUM_PROCESSES=1): nothing to coordinate
    missing = [name for name, value in given.items() if value is None]
    if missing:
        have = ", ".join(SETTINGS[name][0] for name in given if given[name] is not None)
        raise ValueError(f"{_names(missing[0])}: missing; a multi-process run needs all of "
                         f"--coordinator-address, --num-processes and --process-id (given: "
                         f"{have})")
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{_names('coordinator_address')}: expected HOST:PORT, got "
                         f"{address!r}")
    return Settings(str(address), count, index)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None) -> bool:
    """Joins a multi-process run if the arguments or the environment describe one.

    Must run before anything initialises the JAX backend (``jax.devices()``, any computation,
    ``jax.process_count()``). Returns True if ``jax.distributed`` was initialised (also when
    an earlier call of this function did it), False for a single process, where it does
    nothing.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0's coordinator service (the same on every
        process); else ``$JAX_COORDINATOR_ADDRESS``.
      num_processes: processes in the run; else ``$JAX_NUM_PROCESSES``.
      process_id: this process, in ``[0, num_processes)``; else ``$JAX_PROCESS_ID``.
      local_device_ids: restricts this process to these local devices (GPUs); passed on.

    Raises:
      ValueError: incomplete or out-of-range settings (one line naming the flag).
      RuntimeError: the JAX backend is already initialised, so it is too late to join.

    Example: two processes on one machine, 4 simulated CPU devices each (8 in the mesh)::

        # shell 1 and shell 2 (process id 0, then 1):
        XLA_FLAGS=--xla_force_host_platform_device_count=4 zoo pretrain \\
            --config experiments/mae_digits.py:tiny --workdir /tmp/mae2 \\
            --coordinator-address localhost:12355 --num-processes 2 --process-id 0

        # or in Python, first thing:
        import zoo.distributed
        zoo.distributed.initialize("localhost:12355", num_processes=2, process_id=0)
        import zoo; zoo.train(cfg, "/tmp/mae2")
    """
    settings = resolve(coordinator_address, num_processes, process_id)
    if settings is None:
        return False
    import jax
    if jax.distributed.is_initialized():
        return True   # already joined (a notebook re-running its first cell)
    # jax.distributed.initialize raises RuntimeError if the backend is already up.
    if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi", "megascale"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings.auto:
        log.info("distributed: cluster environment detected; jax.distributed.initialize()")
        jax.distributed.initialize(local_device_ids=local_device_ids)
        return True
    kwargs = {}
    host = settings.coordinator_address.rpartition(":")[0]
    if _is_loopback(host) and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:
        kwargs["coordinator_bind_address"] = settings.coordinator_address
    log.info("distributed: process %d of %d, coordinator %s", settings.process_id,
             settings.num_processes, settings.coordinator_address)
    jax.distributed.initialize(settings.coordinator_address, settings.num_processes,
                               settings.process_id, local_device_ids=local_device_ids,
                               **kwargs)
    return True


def _names(name: str) -> str:
    flag, var = SETTINGS[name]
    return f"{flag} (${var})"


def _as_int(name: str, value) -> int | None:
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{_names(name)}: expected an integer, got {value!r}") from None


def _cluster_detected(environ: Mapping[str, str]) -> bool:
    """A launcher JAX detects by itself and that started several processes."""
    def count(var):
        try:
            return int(environ.get(var, "0"))
        except ValueError:
            return 0
    # The variables JAX's SlurmCluster and OmpiCluster need (jax/_src/clusters/).
    slurm = (all(var in environ for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                                            "SLURM_PROCID", "SLURM_LOCALID"))
             and count("SLURM_NTASKS") > 1)
    ompi = "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1
    return slurm or ompi


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
