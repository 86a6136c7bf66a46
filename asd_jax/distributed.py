"""Multi-host start-up: `jax.distributed.initialize` from flags, or from the platform.

Call `initialize` once, before anything touches a JAX device (jax.devices(), any array). After
it, `jax.devices()` lists the devices of every process, `jax.process_index()` /
`jax.process_count()` say which host this is, and the training loop's 1-D "data" mesh spans all
of them (`asd_jax.training.loop`): each process reads only its slice of every global batch.

Three ways to start:
- explicit: `coordinator_address="host0:1234", num_processes=N, process_id=i` on every host
  (process 0 runs the coordinator service on that port);
- `mode="auto"`: `jax.distributed.initialize()` with no arguments, which reads the cluster
  description where the platform provides one (Cloud TPU pods, SLURM, Open MPI, Kubernetes
  jobsets); with no cluster detected the run stays a single process, but a cluster that is
  detected and cannot be joined (coordinator unreachable, say) is an error: every host going
  on alone would train its own copy of the run in the shared workdir;
- `mode="off"`: a single process (the default for one machine).

On CPU-only hosts the cross-process collectives need an implementation: gloo (over TCP) is
selected before initialising (`cpu_collectives`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

MODES = ("off", "auto")


class JoinError(ConnectionError):
    """This process could not join the multi-process job (coordinator unreachable or its port
    taken, a cluster half described). An OSError, so the binaries print it as one `error:`
    line; it is raised before anything is read or written."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after `initialize`: index in [0, count), devices."""

    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int


def initialize(mode: str = "off", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               cpu_collectives: str = "gloo") -> ProcessInfo:
    """Joins (or not) a multi-process JAX job; returns where this process stands.

    Args:
      mode: "off" (single process unless `coordinator_address` is given) or "auto" (ask the
        platform; single process when it describes no cluster).
      coordinator_address: "host:port" of process 0; when set, `num_processes` and `process_id`
        must be set too and `mode` is ignored.
      num_processes: number of processes (hosts) in the job, >= 1.
      process_id: this process's index in [0, num_processes).
      cpu_collectives: jax_cpu_collectives_implementation used for a job of several processes
        ("gloo"; "mpi" needs an MPI build), set before initialising.

    Raises:
      ValueError: an unknown mode, or an incomplete / inconsistent explicit description.
      JoinError: the job described could not be joined (explicit: JAX's error, with the
        address and process named; "auto": anything but finding no cluster, e.g. a cluster
        found but not joined, a coordinator address without a process count, JAX in use).
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("coordinator_address, num_processes and process_id must be given together, "
                             f"got coordinator_address={coordinator_address!r}, "
                             f"num_processes={num_processes!r}, process_id={process_id!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} must be in [0, num_processes={num_processes})")
        if num_processes > 1:
            port = _coordinator_port(coordinator_address)
            if process_id == 0:
                _check_port_free(port, coordinator_address)
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
            try:
                jax.distributed.initialize(coordinator_address=coordinator_address,
                                           num_processes=num_processes, process_id=process_id)
            except (RuntimeError, ValueError) as err:  # JAX names neither address nor process
                raise JoinError(
                    f"distributed: process {process_id} of {num_processes} could not join the job "
                    f"at coordinator_address={coordinator_address} ({type(err).__name__}: {err}). "
                    "Process 0 runs the coordinator there: its port must be free on process 0's "
                    "host and reachable from every host") from err
    elif mode == "auto":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError, TypeError) as err:
            if not _no_cluster_detected(err):
                raise JoinError(
                    f"distributed auto: jax.distributed.initialize() failed ({type(err).__name__}: "
                    f"{err}); not going on as a single process, which on a cluster would train alone "
                    "in the shared workdir. Check the coordinator (JAX_COORDINATOR_ADDRESS, the "
                    "scheduler's variables), or use --distributed off on one machine") from err
            logging.info("distributed auto: no cluster detected (%s); running as one process", err)
    info = process_info()
    logging.info("process %d of %d, %d local devices of %d", info.process_index,
                 info.process_count, info.local_device_count, info.global_device_count)
    return info


def _coordinator_port(address: str) -> int:
    """The port of "host:port" ("[v6 address]:port" too); ValueError naming the address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address {address!r} is not host:port with a port in "
                         "1..65535 (e.g. host0:1234)")
    return int(port)


def _check_port_free(port: int, address: str) -> None:
    """JoinError unless this host can listen on `port` on every interface, IPv4 and IPv6, where
    process 0's coordinator service binds it. A taken port crashed the process inside JAX (a
    segmentation fault, or a JaxRuntimeError naming neither address nor process), so it is tried
    first. The probe binds as the service does: dual-stack (IPV6_V6ONLY off, whatever the host's
    default) where the host has IPv6, else IPv4; SO_REUSEADDR, so that a port left in TIME_WAIT
    by an earlier run is free. Skipped where JAX_COORDINATOR_BIND_ADDRESS tells JAX to bind
    elsewhere; JAX's own error is then wrapped (`initialize`)."""
    if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return
    probe, host = _probe_socket()
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            why = ("another program (an earlier run?) holds it" if err.errno == errno.EADDRINUSE
                   else "ports below 1024 need privileges" if err.errno == errno.EACCES
                   else "the system refused it")
            raise JoinError(
                f"distributed: process 0 runs the coordinator at coordinator_address={address}, "
                f"but this host cannot listen on port {port} ({err.strerror}): {why}; choose "
                "another port") from err


def _probe_socket() -> tuple[socket.socket, str]:
    """(socket, wildcard host): dual-stack IPv6 where the host allows it, as gRPC binds, else
    IPv4."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this host
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:  # cannot be made dual-stack
        sock.close()
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM), "0.0.0.0"
    return sock, "::"


def _no_cluster_detected(err: Exception) -> bool:
    """True for the error of `jax.distributed.initialize()` when nothing describes a cluster.

    With no address given, none in JAX_COORDINATOR_ADDRESS and no cluster environment
    detected (SLURM, Open MPI, Cloud TPU, Kubernetes), JAX is left without a coordinator
    address and raises exactly this ValueError; any other error comes from a cluster that was
    found (or half described) and is not one to ignore.
    """
    return isinstance(err, ValueError) and str(err) == "coordinator_address should be defined."


def process_info() -> ProcessInfo:
    """This process's index and count and the local / global device counts."""
    return ProcessInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                       local_device_count=jax.local_device_count(),
                       global_device_count=jax.device_count())


def allgather_float64(x: np.ndarray) -> np.ndarray:
    """(P, *x.shape) float64: `x` of every process, in process order, bit for bit.

    Every process must pass the same shape. JAX arrays are float32 unless x64 is enabled, so
    the values travel as their raw bits (uint32 pairs) and are viewed back as float64 here.
    With one process it is x[None].
    """
    x = np.asarray(x, np.float64, order="C")  # (np.ascontiguousarray would make a 0-d x 1-d)
    if jax.process_count() == 1:
        return x[None]
    bits = multihost_utils.process_allgather(x.reshape(-1).view(np.uint32))
    return np.asarray(bits, np.uint32).reshape(jax.process_count(), -1).view(np.float64).reshape(
        (jax.process_count(), *x.shape))
