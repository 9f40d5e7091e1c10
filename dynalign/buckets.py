"""How weights leave the learner, one bucket at a time, with no copy beyond the bucket itself.

- ``gather_partitioned``: under ZeRO-3 a parameter lives as one partition per rank. DeepSpeed's
  ``GatheredParameters`` rebuilds it in the parameter's own dtype (fp32) on every rank, and over
  gloo its all-gather stages through a second flat buffer: two fp32 buckets on every rank. Here
  each rank casts its own partition to the output dtype first, and the partitions land straight
  in the output tensor: rank 0 holds one bucket in the output dtype (half an fp32 bucket for
  bf16), the other ranks their partition.
- ``to_wire`` / ``from_wire``: a bucket crosses the object store as raw byte views, which Ray
  writes straight into its shared memory (pickle 5 out-of-band buffers). A serialised blob
  (safetensors bytes) would be a second copy of the bucket in the learner's own memory first.
"""

from __future__ import annotations

import warnings

import torch


def gather_partitioned(params: dict, dtype: torch.dtype, device: str | torch.device | None, keep: bool) -> dict:
    """{name: ZeRO-3 parameter} -> {name: full tensor in ``dtype`` on ``device``}, on the ranks that
    ``keep`` (rank 0); the others return {}. Collective: every rank of the partition group calls
    it with the same parameters in the same order."""
    import torch.distributed as dist

    gathered = {}
    for name, param in params.items():
        group = param.ds_process_group or dist.group.WORLD
        ranks, own, part = dist.get_world_size(group), dist.get_rank(group), param.ds_tensor.ds_numel
        piece = param.ds_tensor.detach().to(dtype)
        if dist.get_backend(group) == "gloo":
            # gloo's all-gather and gather stage through a flat buffer of the whole tensor; its
            # point-to-point receive writes into the given memory. The receiver is group rank 0.
            root = dist.get_global_rank(group, 0)
            if not keep:
                dist.send(piece, root, group=group)
                continue
            full = torch.empty(part * ranks, dtype=dtype, device=piece.device)
            for source in range(ranks):
                target = full.narrow(0, source * part, part)
                if source == own:
                    target.copy_(piece)
                else:
                    dist.recv(target, dist.get_global_rank(group, source), group=group)
        else:  # NCCL gathers into the given tensor
            full = torch.empty(part * ranks, dtype=dtype, device=piece.device)
            dist.all_gather_into_tensor(full, piece, group=group)
            if not keep:
                continue
        del piece
        # DeepSpeed pads the flat parameter to a multiple of the ranks (partition_parameters.py).
        gathered[name] = full.narrow(0, 0, param.ds_numel).view(param.ds_shape).to(device or full.device)
    return gathered


def to_wire(bucket: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple, object]]:
    """A CPU bucket as (name, dtype, shape, uint8 array viewing the tensor's bytes) for ``ray.put``."""
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy())
            for name, t in bucket.items()]


def from_wire(wire: list[tuple[str, str, tuple, object]]) -> list[tuple[str, torch.Tensor]]:
    """``to_wire`` back to (name, tensor). The tensors view the object store's read-only memory:
    the engine only reads them (reload copies them into its own weights)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [(name, torch.from_numpy(data).view(getattr(torch, dtype)).view(shape))
                for name, dtype, shape, data in wire]
