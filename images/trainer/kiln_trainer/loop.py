"""The training loop and ``main``: config -> checks -> (distributed) training -> checkpoints -> artifact.

Distributed runs use the standard ``env://`` variables (torchrun, or the operator directly with one process per
pod): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Kubeflow-style PET_* variables are mapped to them
when the trainer runs without torchrun (docs/trainer.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kiln_artifacts.contract import (
    ExitCode,
    InfrastructureError,
    UserError,
    WorkloadError,
    progress_line,
    termination_log_path,
    termination_message,
    write_termination_message,
)

from .config import TrainConfig, parse_config
from .report import ProgressReporter, now_iso

if TYPE_CHECKING:
    from kiln_artifacts.profile import Profile

log = logging.getLogger("kiln_trainer")
_stop_requested = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Only set a flag: the loop checkpoints at the next step boundary, where the state is consistent.
    global _stop_requested
    _stop_requested = True


def map_pet_env(env: MutableMapping[str, str]) -> None:
    """Without torchrun, accept Kubeflow's PET_* names (one process per node): node rank = rank."""
    if "RANK" in env or "PET_NNODES" not in env:
        return
    if env.get("PET_NPROC_PER_NODE", "1") not in ("1", "auto"):
        raise UserError("PET_NPROC_PER_NODE > 1 needs torchrun (torchrun reads PET_* itself)")
    env["WORLD_SIZE"] = env["PET_NNODES"].split(":")[-1]
    env["RANK"] = env.get("PET_NODE_RANK", "0")
    env.setdefault("LOCAL_RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if f"PET_{name}" in env:
            env.setdefault(name, env[f"PET_{name}"])


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env(env: Mapping[str, str]) -> Dist:
    try:
        d = Dist(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK: must be integers ({e})") from None
    if not 0 <= d.rank < d.world:
        raise UserError(f"RANK: must be in 0..WORLD_SIZE-1, got RANK={d.rank} WORLD_SIZE={d.world}")
    if d.world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise UserError("MASTER_ADDR and MASTER_PORT: required when WORLD_SIZE > 1")
    return d


@dataclass
class Outcome:
    code: ExitCode
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    cfg: TrainConfig | None = None
    dist = Dist()
    try:
        try:
            cfg = parse_config(argv)
        except SystemExit as e:  # argparse already printed the usage and the reason
            if e.code in (0, None):
                return 0  # --help
            raise UserError("command line: invalid arguments (see the usage message above)") from None
        map_pet_env(os.environ)
        dist = dist_from_env(os.environ)
        outcome = Trainer(cfg, dist).run()
    except WorkloadError as e:
        outcome = Outcome(e.code, e.message)
    except Exception as e:
        outcome = Outcome(classify(e), f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if outcome.code != ExitCode.SUCCEEDED:
        log.error("%s (exit %d)", outcome.message, outcome.code)
    # Every process of a failing pod may write; on success only each pod's first process does.
    if outcome.code != ExitCode.SUCCEEDED or dist.local_rank == 0:
        path = Path(cfg.termination_log) if cfg and cfg.termination_log else termination_log_path(argv, os.environ)
        write_termination_message(path, termination_message(outcome.code, outcome.message, **outcome.fields))
    return int(outcome.code)


def classify(e: BaseException) -> ExitCode:
    """Failure class of an unexpected exception (WorkloadErrors carry their own)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return ExitCode.OUT_OF_MEMORY
    if isinstance(e, torch.distributed.DistError | ConnectionError | TimeoutError):
        return ExitCode.INFRASTRUCTURE
    text = str(e)
    if "out of memory" in text.lower():
        return ExitCode.OUT_OF_MEMORY
    peer_lost = any(s in text for s in ("Connection closed", "Connection reset", "NCCL", "Gloo", "timed out"))
    if peer_lost and torch.distributed.is_available() and torch.distributed.is_initialized():
        return ExitCode.INFRASTRUCTURE  # a peer went away mid-collective
    return ExitCode.UNKNOWN


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: Dist) -> None:
        self.cfg = cfg
        self.dist = dist

    # --- setup: everything that can be wrong with the inputs is checked here, before the model is built ------

    def run(self) -> Outcome:
        from kiln_artifacts.datasets import load_dataset

        from .data import check_model_dir

        cfg = self.cfg
        wait = cfg.extra_int("inputWaitSeconds", 0, 0, 86400)
        dataset = load_dataset(cfg.dataset_uri, cfg.extra.get("task"), wait)
        self.dataset = dataset
        model_src = None
        if cfg.model_uri is not None:
            model_src, _ = check_model_dir(cfg.model_uri, dataset.task, wait)
        elif dataset.task == "text-classification":
            raise UserError("model.uri: text-classification fine-tunes a pretrained model; set model.uri")
        self.model_src = model_src
        per_step = cfg.batch_size * self.dist.world * cfg.gradient_accumulation_steps
        n_train = len(dataset.train_y)
        if per_step > n_train:
            raise UserError(
                f"hyperparameters.batchSize: batchSize x WORLD_SIZE x gradientAccumulationSteps = {per_step} "
                f"exceeds the {n_train} training examples"
            )
        self.steps_per_epoch = n_train // per_step
        self.total_steps = cfg.max_steps or (cfg.epochs or 1) * self.steps_per_epoch
        warmup = cfg.extra_int("warmupSteps", 0, 0, 100_000_000)
        if warmup >= self.total_steps:
            raise UserError(f"hyperparameters.extra.warmupSteps: must be < total steps {self.total_steps}")
        return self._train()

    def _setup_torch(self) -> None:
        import torch

        self.torch = torch
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.autocast_dtype = None
        if self.cfg.precision != "fp32":
            if self.device.type == "cuda":
                self.autocast_dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
            else:
                log.info("precision %s: no CUDA device, training in fp32", self.cfg.precision)
        self.pg = False
        if self.dist.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            seconds = self.cfg.dist_timeout_seconds
            try:
                torch.distributed.init_process_group(
                    backend,
                    rank=self.dist.rank,
                    world_size=self.dist.world,
                    timeout=timedelta(seconds=seconds),
                    device_id=self.device if backend == "nccl" else None,
                )
            except Exception as e:
                where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                raise InfrastructureError(f"rendezvous with {where} failed: {type(e).__name__}: {e}") from None
            self.pg = True

    def _build(self) -> None:
        import torch

        from kiln_artifacts.models import build_image_model

        from . import models

        ds, cfg = self.dataset, self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every attempt
        base = self.model_src.path if self.model_src else None
        self.unk_id: int | None = None
        self.pad_id: int | None = None
        if ds.task == "image-classification":
            self.model = build_image_model(len(ds.classes), base)
            self.train_inputs = {"images": torch.from_numpy(ds.train_x.copy())}
            self.test_inputs = {"images": torch.from_numpy(ds.test_x.copy())} if ds.test_x is not None else None
        else:
            assert base is not None
            max_len = cfg.extra_int("maxSeqLength", 64, 8, 512)
            self.max_len = max_len
            self.model = models.build_text_model(base, ds.classes)
            tok = models.load_tokenizer(base)
            self.unk_id, self.pad_id = tok.unk_token_id, tok.pad_token_id
            self.train_inputs = models.tokenize(tok, ds.train_x, max_len)
            self.test_inputs = models.tokenize(tok, ds.test_x, max_len) if ds.test_x is not None else None
        self.train_labels = torch.from_numpy(ds.train_y)
        self.test_labels = torch.from_numpy(ds.test_y) if ds.test_y is not None else None
        self.model.to(self.device)
        self.ddp = self.model
        if self.pg:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        decay = cfg.extra_float("weightDecay", 0.01, 0.0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=decay)
        warmup, total = cfg.extra_int("warmupSteps", 0, 0, 100_000_000), self.total_steps

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 at the last step
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(enabled=self.autocast_dtype == torch.float16)

    def _host_batch(self, inputs: Mapping[str, Any], idx: Any) -> dict[str, Any]:
        """The model's inputs for ``idx``, still on the host."""
        from .models import image_batch

        if "images" in inputs:
            return image_batch(inputs["images"][idx])
        return {k: v[idx] for k, v in inputs.items()}

    def _batch(self, inputs: Mapping[str, Any], idx: Any) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) for k, v in self._host_batch(inputs, idx).items()}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- state -----------------------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        import numpy as np

        torch = self.torch
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        import numpy as np

        torch = self.torch
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _checkpoint(self, step: int) -> None:
        from . import checkpoint

        rng = [self._rng_state()]
        if self.pg:  # every rank's RNG (dropout), gathered on all ranks by the collective
            gathered: list[Any] = [None] * self.dist.world
            self.torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        if self.dist.main and self.cfg.checkpoint_uri:
            state = {
                "step": step,
                "world_size": self.dist.world,
                "global_batch": self.cfg.batch_size * self.dist.world * self.cfg.gradient_accumulation_steps,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
            }
            checkpoint.save(self.cfg.checkpoint_uri, step, state, self.cfg.checkpoint_keep, self.cfg.hyperparameters())
        if self.pg:
            self.torch.distributed.barrier()  # nobody runs ahead of a checkpoint that may be the resume point
        self.last_checkpoint_time = time.monotonic()
        self.last_checkpoint_step = step  # on every rank: decisions based on it must agree across ranks
        if self.cfg.checkpoint_uri:  # every rank reports the same checkpoint (each may write the message)
            uri = f"{self.cfg.checkpoint_uri.rstrip('/')}/{checkpoint.name_for(step)}"
            self.last_checkpoint = {"step": step, "uri": uri, "time": now_iso()}
            self.progress.update(force=True, lastCheckpoint=self.last_checkpoint)
            if self.dist.main:
                log.info("checkpoint %s", uri)

    def _resume(self) -> int:
        from . import checkpoint

        if self.cfg.resume == "Never":
            return 0
        found = checkpoint.list_checkpoints(self.cfg.checkpoint_uri) if self.cfg.checkpoint_uri else []
        if found:
            ck = found[-1]  # this job's own newest complete checkpoint wins over resume.fromUri
        elif self.cfg.resume_from:
            ck = checkpoint.Checkpoint(step=-1, uri=self.cfg.resume_from)
        else:
            return 0
        state = checkpoint.load_state(ck)
        global_batch = self.cfg.batch_size * self.dist.world * self.cfg.gradient_accumulation_steps
        if state["global_batch"] != global_batch:
            raise UserError(
                f"checkpoint {ck.uri}: global batch {state['global_batch']} differs from this run's {global_batch} "
                "(batchSize x WORLD_SIZE x gradientAccumulationSteps); the data position would not match"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == self.dist.world:
            self._set_rng_state(state["rng"][self.dist.rank])
        self.last_checkpoint = {"step": int(state["step"]), "uri": ck.uri}
        log.info("resumed from %s (step %d)", ck.uri, int(state["step"]))
        return int(state["step"])

    # --- the loop --------------------------------------------------------------------------------------------

    def _flags(self, stop: bool, time_due: bool) -> tuple[bool, bool]:
        """Agree across ranks: any rank's SIGTERM stops all; rank 0's clock decides time-based checkpoints."""
        if not self.pg:
            return stop, time_due
        # On the training device: an NCCL group has no backend for CPU tensors.
        t = self.torch.tensor([float(stop), float(time_due and self.dist.main)], device=self.device)
        self.torch.distributed.all_reduce(t, op=self.torch.distributed.ReduceOp.MAX)
        return bool(t[0]), bool(t[1])

    def _evaluate(self, with_profile: bool = False) -> dict[str, float]:
        """Metrics on the test split; with ``with_profile``, also the reference profile of the same pass
        (``self.profile``): its features are gathered batch by batch, on the host, as small numpy arrays."""
        from kiln_artifacts import profile

        torch = self.torch
        if self.test_inputs is None or self.test_labels is None:
            return {}
        size = self.cfg.extra_int("evalBatchSize", 256, 1, 1_000_000)
        self.model.eval()
        correct, loss_sum, n = 0, 0.0, len(self.test_labels)
        features: list[dict[str, Any]] = []
        with torch.no_grad(), self._autocast():
            for start in range(0, n, size):
                idx = torch.arange(start, min(n, start + size))
                host = self._host_batch(self.test_inputs, idx)
                logits = self.model(**{k: v.to(self.device, non_blocking=True) for k, v in host.items()}).float()
                y = self.test_labels[idx].to(self.device)
                loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(-1) == y).sum())
                if with_profile:
                    features.append({**profile.output_features(logits.cpu().numpy()), **self._input_features(host)})
        self.model.train()
        if with_profile:
            self.profile = self._build_profile(features)
        return {"eval_accuracy": correct / n, "eval_loss": loss_sum / n}

    def _input_features(self, host: Mapping[str, Any]) -> dict[str, Any]:
        """The input signals of one evaluation batch, from the tensors the model was fed (profile.py computes
        them the same way for live traffic)."""
        import numpy as np

        from kiln_artifacts import profile

        if "pixel_values" in host:
            return profile.image_features(host["pixel_values"].numpy())
        ids = host["input_ids"].numpy()
        if "attention_mask" in host:
            mask = host["attention_mask"].numpy()
        else:  # a tokenizer without a mask pads with its pad token
            mask = ids != self.pad_id if self.pad_id is not None else np.ones_like(ids)
        return profile.token_features(ids, mask, self.unk_id)

    def _build_profile(self, batches: Sequence[Mapping[str, Any]]) -> Profile:
        import numpy as np

        from kiln_artifacts import profile

        ds = self.dataset
        source = {"from": "evaluation", "dataset": self.cfg.dataset_uri, "split": "test", "outputs": "model"}
        if ds.source.digest:
            source["datasetDigest"] = ds.source.digest
        if ds.task == "text-classification":
            source["maxSequenceLength"] = str(self.max_len)  # token counts are cut here
        features = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
        return profile.build(ds.task, features, labels=ds.classes, source=source)

    def _epoch_order(self, epoch: int) -> Any:
        # The order depends only on (seed, epoch): a resumed run sees the same batches without saved sampler state.
        g = self.torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return self.torch.randperm(len(self.train_labels), generator=g)

    def _micro_batches(self, step: int) -> Iterator[Any]:
        """Index tensors of this rank's micro-batches for optimizer step ``step`` (0-based)."""
        b, w, a = self.cfg.batch_size, self.dist.world, self.cfg.gradient_accumulation_steps
        epoch, within = divmod(step, self.steps_per_epoch)
        if getattr(self, "_order_epoch", None) != epoch:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        for m in range(within * a, (within + 1) * a):
            start = m * b * w + self.dist.rank * b  # each rank takes its slice of the global micro-batch
            yield self._order[start : start + b]

    def _train(self) -> Outcome:
        self._setup_torch()
        self._build()
        torch, cfg = self.torch, self.cfg
        interval = cfg.extra_float("progressIntervalSeconds", 5.0, 0.0)
        progress_path = self._progress_path()
        self.progress = ProgressReporter(progress_path if self.dist.main else None, self.total_steps, interval)
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_checkpoint_time = time.monotonic()
        step = start_step = self._resume()
        self.last_checkpoint_step = start_step if start_step else None
        self.progress.update(force=True, step=step, startedAt=now_iso(), resumedFromStep=start_step or None)
        if cfg.checkpoint_uri and self.dist.main:
            log.info("checkpoints: %s (keep %d)", cfg.checkpoint_uri, cfg.checkpoint_keep)
        a = cfg.gradient_accumulation_steps
        samples_per_step = cfg.batch_size * self.dist.world * a
        started = time.monotonic()
        loss_sum = torch.zeros((), device=self.device)  # summed on device: no host sync per step
        loss_count = 0
        metrics: dict[str, float] = {}
        self.model.train()
        while step < self.total_steps:
            for m, idx in enumerate(self._micro_batches(step)):
                batch = self._batch(self.train_inputs, idx)
                y = self.train_labels[idx].to(self.device, non_blocking=True)
                sync = not self.pg or m == a - 1
                with contextlib.nullcontext() if sync else self.ddp.no_sync(), self._autocast():
                    loss = torch.nn.functional.cross_entropy(self.ddp(**batch).float(), y) / a
                self.scaler.scale(loss).backward()
                loss_sum += loss.detach()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            step += 1
            loss_count += 1
            minutes_due = time.monotonic() - self.last_checkpoint_time >= cfg.checkpoint_every_minutes * 60
            stop, minutes_due = self._flags(_stop_requested, minutes_due)
            if self.progress.due() or step == self.total_steps or stop:
                elapsed = time.monotonic() - started
                rate = (step - start_step) * samples_per_step / max(elapsed, 1e-9)
                self.progress.update(
                    step=step,
                    epoch=round(step / self.steps_per_epoch, 4),
                    loss=round(loss_sum.item() / max(1, loss_count), 6),  # mean over the steps since the last write
                    samplesPerSecond=round(rate, 2),
                    etaSeconds=round((self.total_steps - step) * samples_per_step / rate, 1) if rate else None,
                )
                loss_sum.zero_()
                loss_count = 0
                if self.dist.main:
                    log.info("%s", progress_line(self.progress.state))
            end_of_epoch = step % self.steps_per_epoch == 0
            if self.dist.main and (
                (cfg.eval_every_steps and step % cfg.eval_every_steps == 0)
                or (not cfg.eval_every_steps and end_of_epoch and step < self.total_steps)
            ):
                metrics = self._evaluate()
                self.progress.update(force=True, **metrics)
                log.info("step %d: %s", step, metrics)
            if stop:
                self._checkpoint(step)
                self.progress.update(force=True, phase="Preempted")
                msg = f"SIGTERM: stopped at step {step} of {self.total_steps} after a final checkpoint"
                if not cfg.checkpoint_uri:
                    msg = f"SIGTERM: stopped at step {step} of {self.total_steps}; no checkpoint.uri, nothing saved"
                return Outcome(ExitCode.PREEMPTED, msg, {"step": step, "lastCheckpoint": self.last_checkpoint})
            if cfg.checkpoint_uri and (
                (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0) or minutes_due
            ):
                self._checkpoint(step)
        return self._finish(step)

    def _progress_path(self) -> Path | None:
        from kiln_artifacts import parse_uri

        if self.cfg.progress_file:
            return Path(self.cfg.progress_file)
        if self.cfg.checkpoint_uri:
            local = parse_uri(self.cfg.checkpoint_uri).local_path()
            if local is not None:
                return local / "progress.json"
        return None

    def _finish(self, step: int) -> Outcome:
        import kiln_artifacts as ka
        from kiln_artifacts.profile import PROFILE_ANNOTATION, PROFILE_FILE

        from .models import save_model

        cfg = self.cfg
        # A final checkpoint makes a retry after this point cheap: it resumes at the end and republishes.
        if cfg.checkpoint_uri and self.last_checkpoint_step != step:
            self._checkpoint(step)
        self.profile: Profile | None = None
        metrics = self._evaluate(with_profile=True) if self.dist.main else {}
        artifact: dict[str, Any] | None = None
        if self.dist.main and cfg.output_uri:
            tmp = Path(tempfile.mkdtemp(prefix="kiln-model-"))
            try:
                fmt = save_model(
                    self.model, tmp / "model", self.dataset.classes, self.model_src and self.model_src.path
                )
                annotations: dict[str, str] = {}
                if self.profile is not None:  # no test split: no evaluation, no reference
                    self.profile.write(tmp / "model")
                    annotations[PROFILE_ANNOTATION] = PROFILE_FILE
                parents = (self.model_src.digest,) if self.model_src and self.model_src.digest else ()
                lineage = ka.Lineage(
                    producer=cfg.producer,
                    image=cfg.image,
                    parents=parents,
                    dataset=ka.DatasetRef(cfg.dataset_uri, self.dataset.source.digest),
                    hyperparameters=cfg.hyperparameters(),
                    libraries=ka.library_versions("torch", "transformers", "safetensors", "kiln"),
                )
                final = {**metrics, "steps": float(step)}
                if "loss" in self.progress.state:
                    final["train_loss"] = float(self.progress.state["loss"])
                try:
                    art = ka.publish(
                        tmp / "model",
                        cfg.output_uri,
                        format=fmt,
                        kind="model",
                        task=self.dataset.task,
                        metrics=final,
                        lineage=lineage,
                        annotations=annotations,
                        signer=cfg.signer,
                    )
                except ka.ArtifactExistsError as e:
                    raise UserError(f"output.uri {cfg.output_uri}: {e}") from None
                except (ka.CredentialsError, OSError) as e:
                    raise InfrastructureError(f"output.uri {cfg.output_uri}: {type(e).__name__}: {e}") from None
                artifact = {"uri": art.uri, "digest": art.digest}
                # An artifact an earlier attempt published is returned as it is: report who signed it, checked.
                signed_by = ka.signers(art.manifest.to_dict(), where=art.uri)
                if signed_by:
                    artifact["signedBy"] = signed_by
                log.info(
                    "published %s (%s; %s)",
                    art.uri,
                    art.digest,
                    f"signed by {', '.join(signed_by)}" if signed_by else "unsigned",
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.progress.update(force=True, phase="Succeeded", step=step, artifact=artifact, **metrics)
        if self.pg:
            self.torch.distributed.barrier()
            self.torch.distributed.destroy_process_group()
        return Outcome(
            ExitCode.SUCCEEDED,
            f"trained {step} steps",
            {"step": step, "totalSteps": self.total_steps, "metrics": metrics or None, "artifact": artifact},
        )


def run_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run_main()
