"""Process groups: the world (via DeepSpeed), megatron-core's model-parallel groups, and the adapter
DeepSpeed's ``mpu=`` argument needs to see them.

Order of calls on every rank::

    init_distributed()                        # world group; nccl on GPU, gloo on CPU
    init_model_parallel(tp, pp, vpp)          # megatron parallel_state (TP innermost)
    engine = deepspeed.initialize(..., mpu=DeepSpeedMPU())
    ...
    destroy()
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from largelm.parallel.cpu_compat import enable_cpu_compat
from largelm.parallel.deepspeed_compat.ops import prepare_cpu_comm_op
from largelm.parallel.network import choose_socket_interface

# megatron's rank order string, fastest-varying first: consecutive global ranks form a TP group, so
# with ranks packed per node TP stays inside a node (NVLink); pipeline stages are furthest apart.
RANK_ORDER = "tp-cp-ep-dp-pp"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """This rank's compute device: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    backend: Optional[str] = None,
    timeout_s: float = 1800.0,
    *,
    init_method: Optional[str] = None,
    rank: int = -1,
    world_size: int = -1,
) -> torch.device:
    """Start the world process group through ``deepspeed.init_distributed``; return ``device()``.

    By default rank/world size/master address come from the launcher's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``). ``init_method`` (e.g.
    ``tcp://127.0.0.1:PORT`` or ``file://...``) with explicit ``rank``/``world_size`` is for tests
    and tools that start ranks themselves. Also installs the CPU compatibility layer (a no-op on GPU).
    """
    import deepspeed  # deferred: importing deepspeed probes accelerators and logs

    backend = backend or default_backend()
    if init_method is None and os.environ.get("MASTER_ADDR"):  # launched: talk over the route to the master
        line = choose_socket_interface(os.environ["MASTER_ADDR"])
        if line and local_rank() == 0:
            print(line, flush=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # before NCCL init, so each rank owns its own GPU
    prepare_cpu_comm_op()  # CPU: build/load DeepSpeed's shm op before any rendezvous, never on a stale lock
    deepspeed.init_distributed(
        dist_backend=backend,
        timeout=timedelta(seconds=timeout_s),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        # With an explicit init_method there is nothing to discover; without env vars DeepSpeed would
        # otherwise try mpi4py.
        auto_mpi_discovery=init_method is None,
        verbose=False,
    )
    unlink_deepspeed_shm()
    enable_cpu_compat()
    return device()


def unlink_deepspeed_shm() -> None:
    """Remove the names of the POSIX shared-memory segments DeepSpeed's CPU backend leaves behind.

    Without CUDA, ``deepspeed.init_distributed`` loads its ``deepspeed_shm_comm`` op, which - when all ranks are
    local (the deepspeed launcher's ``LOCAL_SIZE`` equals the world size) - creates one 66 MiB segment per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, maps every rank's, and never
    unlinks them: each CPU run left 66 MiB x ranks of RAM (tmpfs) behind after exit (18 GB had piled up on the dev
    machine). ``init_distributed`` returns on a rank only after it has mapped every segment; after a barrier that is
    true on all ranks, so each rank can unlink its own name: the mappings stay valid for the run (DeepSpeed uses
    them only for ``inference_all_reduce``; training collectives go through gloo) and the memory is freed when the
    last rank exits. Collective (all ranks call it from ``init_distributed``); a no-op on GPU.
    """
    if torch.cuda.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if os.environ.get("LOCAL_SIZE") != str(world):  # the test DeepSpeed's shm op applies: no segments otherwise
        return
    if world > 1:
        dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except OSError:  # not created (shm op unavailable), or not Linux
        pass


def init_model_parallel(tensor_parallel: int, pipeline_parallel: int, virtual_pipeline: Optional[int] = None,
                        expert_parallel: int = 1) -> None:
    """megatron-core parallel_state for TP x PP (x DP = the rest of the world), TP innermost. ``expert_parallel``
    (MoE) splits each data-parallel group into expert-parallel groups of that size (consecutive DP ranks, order
    ``RANK_ORDER``) and expert-data-parallel groups (the ranks holding the same experts)."""
    if not dist.is_initialized():
        raise RuntimeError("init_model_parallel() needs init_distributed() first")
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel x pipeline_parallel = "
            f"{tensor_parallel} x {pipeline_parallel}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
        order=RANK_ORDER,
        # Extra gloo copies of the data-parallel groups serve megatron's distributed optimizer,
        # which we do not use (DeepSpeed ZeRO shards the optimizer).
        create_gloo_process_groups=False,
    )


def destroy() -> None:
    """Tear down megatron's groups and the world group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """What ``deepspeed.initialize(mpu=...)`` (0.19.8) asks of a model-parallel unit, answered from
    megatron-core's parallel_state.

    DeepSpeed's names: "model parallel" = TP x PP (ZeRO reduces grad norms/overflow flags over it and
    names checkpoint files by its rank); "data parallel" = the ZeRO sharding and gradient averaging
    group; ``get_tensor_model_parallel_*``/``get_pipeline_model_parallel_*`` feed checkpoint metadata,
    grad-norm de-duplication of TP-replicated params, and activation checkpointing.

    Deliberately absent: ``get_sequence_parallel_*``/``initialize_sequence_parallel``. In DeepSpeed
    they mean Ulysses sequence parallelism and would change its data-parallel group and loss
    scaling; megatron's sequence parallelism lives inside the TP group and DeepSpeed must not know.
    """

    # -- model parallel (TP x PP) -----------------------------------------------------------------
    def get_model_parallel_group(self):
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    # -- data parallel ----------------------------------------------------------------------------
    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # -- tensor parallel --------------------------------------------------------------------------
    def get_tensor_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    # -- pipeline parallel ------------------------------------------------------------------------
    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()
