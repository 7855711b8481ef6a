"""Every rank checks, right after the process group forms, that all ranks belong to the same run.

Why: two jobs started on one machine with the same master port can rendezvous into one group
(the second job's ranks connect to the first job's store), and then write each other's
checkpoints. Each rank contributes its run identity, the output directory and a hash of the
resolved config, and every rank compares all of them, so all ranks refuse together, with the same
one line, before any model, data or checkpoint is touched.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


class RunIdentityError(RuntimeError):
    """Ranks of different runs in one process group (one line)."""


@dataclass(frozen=True)
class RunIdentity:
    output_dir: str
    config_hash: str

    @classmethod
    def of(cls, config: dict[str, Any], output_dir: str) -> "RunIdentity":
        text = json.dumps(config, sort_keys=True, default=str)
        return cls(str(output_dir), hashlib.sha256(text.encode()).hexdigest()[:16])


def mismatch(identities: list[RunIdentity]) -> str | None:
    """The one-line refusal when the ranks' identities differ, else None."""
    first = identities[0]
    for rank, other in enumerate(identities):
        if other != first:
            return (f"rank {rank} belongs to another run (output_dir {other.output_dir}, config "
                    f"{other.config_hash}) than rank 0 (output_dir {first.output_dir}, config "
                    f"{first.config_hash}): two jobs share a master port; give each job its own "
                    "MASTER_PORT (single-node launch scripts pick a free one when it is unset)")
    return None


def check_run_identity(identity: RunIdentity, world: int) -> None:
    """Collective: raise RunIdentityError on every rank when any two ranks' identities differ."""
    identities: list[Any] = [None] * world
    dist.all_gather_object(identities, identity)
    if (problem := mismatch(identities)) is not None:
        raise RunIdentityError(problem)
