"""What a server or a client process does, in plain tensors (no Flower here).

A `Worker` is created once per process and config: it holds the frozen base model with the
method's adapters, the tokenizer, and the experiment's data. A virtual client costs only its
adapter state: `train_client` loads that state into the shared model, trains, and returns
the upload. The Flower apps in `server/` and `clients/` translate messages and call these.

A client process given the run's prepared partitions (`fedsb.experiment.prepared`, written by
the server) reads only the tokens of the partitions it serves: it never loads the dataset, the
tokenizer, or the libraries that build them (datasets, flwr-datasets, pandas, scipy,
matplotlib), which are imported here only where they are used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedsb.core.adapters import (
    COMPONENTS,
    HEAD,
    State,
    component_of,
    extract_state,
    load_state,
    set_active_rank,
)
from fedsb.core.init import accumulate_gradients
from fedsb.core.memory import release_free_memory
from fedsb.core.models import find_target_modules, load_model, load_tokenizer, resolve_device, resolve_dtype
from fedsb.data.schema import TEXT_PAIR, column
from fedsb.data.tokens import (
    evaluation_batches,
    iterate_batches,
    tokenize,
    tokenize_instructions,
    tokenize_prompts,
)
from fedsb.experiment.cohort import hash_seed
from fedsb.experiment.config import AUTO_CLIENTS, ExperimentConfig
from fedsb.experiment.prepared import PreparedPartitions, read_prepared, share_base_weights
from fedsb.methods import build_method
from fedsb.methods.base import FederatedMethod
from fedsb.methods.ranks import state_rank
from fedsb.training.generation import generation_accuracy
from fedsb.training.local import TrainResult, evaluate, to_device, train_local

if TYPE_CHECKING:
    from datasets import Dataset

    from fedsb.experiment.task import TaskData
    from fedsb.training.privacy.accounting import PrivacyLedger

logger = logging.getLogger(__name__)

class Worker:
    """One base model with adapters, one tokenizer, one copy of the data: per process."""

    def __init__(self, config: ExperimentConfig, prepared: PreparedPartitions | None = None):
        # num_clients 'auto' is resolved by the apps from the federation; used directly, as fedsb run does
        config = config.with_clients(AUTO_CLIENTS)
        self.config = config
        self.prepared = prepared
        self.label_names = prepared.label_names if prepared is not None else self.data.label_names
        m = config.model
        num_labels = len(self.label_names)
        # The base model is placed on its device once; only adapter-sized tensors move per client.
        self.device = resolve_device(m.device)
        self.model = load_model(m.name, task=m.task, num_labels=num_labels, seed=config.seed,
                                dtype=resolve_dtype(m.dtype, self.device), device=self.device)
        if config.train.gradient_checkpointing:
            # Non-reentrant: gradients reach the adapters although every base weight is frozen.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = find_target_modules(self.model, m.target_modules)
        self.method: FederatedMethod = build_method(
            config.method.name, self.model, targets, config.method.rank, config.lora_alpha,
            init=config.method.init.name, rank_aggregation=config.federation.rank_aggregation)
        if prepared is not None and prepared.base_weights is not None:
            share_base_weights(self.model, prepared.base_weights)  # one copy per machine, mapped
        # The model is shared by every client and run of this process: remember the head's
        # initial weights so each run starts from them, not from the last state loaded.
        self.initial_head = extract_state(self.model, (HEAD,))

    @cached_property
    def data(self) -> TaskData:
        """The experiment's data, loaded, split and partitioned (on first use)."""
        from fedsb.experiment.task import load_task_data

        return load_task_data(self.config)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.config.model.name)

    @property
    def generates(self) -> bool:
        """A causal LM: evaluated by the exact match of its greedily generated answers."""
        return self.config.model.task == "causal_lm"

    def tokens(self, dataset: Dataset) -> dict[str, torch.Tensor]:
        """Training (and teacher-forced loss) tensors: class labels, or response-only token labels."""
        from fedsb.data.instructions import INPUT

        d, length = self.config.data, self.config.model.max_length
        if self.generates:
            return tokenize_instructions(dataset, self.tokenizer, length, template=d.template,
                                         input_column=INPUT if d.input_column else None)
        return tokenize(dataset, self.tokenizer, length,
                        text_pair_column=TEXT_PAIR if d.text_pair_column else None)

    def prompt_tokens(self, dataset: Dataset) -> dict[str, torch.Tensor]:
        """The prompts alone, left-padded, for generation."""
        from fedsb.data.instructions import INPUT

        d = self.config.data
        return tokenize_prompts(dataset, self.tokenizer, self.config.model.max_length, template=d.template,
                                input_column=INPUT if d.input_column else None)

    @cached_property
    def test_tokens(self) -> dict[str, torch.Tensor]:
        return self.tokens(self.data.test)

    @cached_property
    def validation_tokens(self) -> dict[str, torch.Tensor]:
        return self.tokens(self.data.validation)

    # -- client side -----------------------------------------------------------------------
    def client_tokens(self, partition_id: int) -> dict[str, torch.Tensor]:
        if self.prepared is not None:
            return self.prepared.tokens(partition_id)
        return self.tokens(self.data.partitions[partition_id])

    def aggregation_weight(self, partition_id: int) -> int:
        """What a client reports as its aggregation weight (`federation.weighting`): its number of
        training examples (FedAvg, McMahan et al. 2017), or 1 for every client (a plain mean, which
        also keeps the client's dataset size to itself)."""
        if self.config.federation.weighting == "uniform":
            return 1
        if self.prepared is not None:
            return self.prepared.size(partition_id)
        return len(self.data.partitions[partition_id])

    def train_client(self, partition_id: int, state: State, server_round: int,
                     ledger: PrivacyLedger | None = None) -> tuple[State, TrainResult]:
        """Load the client's full adapter state, train locally, return what it uploads.

        With a privacy ledger the steps are DP-SGD (Opacus) and are charged to it. A client sent a
        lower-rank adapter than the global (fedsb.methods.ranks) trains and uploads that rank.
        """
        t = self.config.train
        rank = self.client_rank(state)
        load_state(self.model, self.method.client_state(state, self.computed_fixed_state))
        data = self.client_tokens(partition_id)
        seed = hash_seed(self.config.seed, server_round, partition_id)
        torch.manual_seed(seed)  # dropout: reproducible per (seed, round, client)
        before_step = self.nested_rank_sampler(rank, seed) if t.nested_ranks else None
        with self.at_rank(rank):
            if ledger is not None:
                from fedsb.training.privacy.dpsgd import train_local_private

                on_device = to_device(data, self.device)  # Opacus samples on the device
                result = train_local_private(self.model, self.method, on_device, t.local_steps, t.lr, ledger,
                                             optimizer=t.optimizer, seed=seed, before_step=before_step)
                return self.upload(rank), result

            def batches():
                epoch = 0
                while True:
                    yield from iterate_batches(data, t.batch_size, seed=seed + epoch)
                    epoch += 1

            result = train_local(self.model, self.method, batches(), t.local_steps, t.lr, t.optimizer,
                                 before_step=before_step)
            return self.upload(rank), result

    @contextmanager
    def at_rank(self, rank: int | None) -> Iterator[None]:
        """The model with its adapters' active rank set (None: all of it) for one piece of work; after
        it, the full rank again, and the work's freed memory (activations) given back to the OS, so a
        process does not hold it while other clients work (fedsb.core.memory)."""
        set_active_rank(self.model, rank)
        try:
            yield
        finally:
            set_active_rank(self.model, None)
            release_free_memory()

    def client_rank(self, received: State) -> int:
        """The rank of the adapter a client was sent: the server decides (federation.client_ranks),
        the shapes say."""
        return state_rank(received) or self.method.rank

    def nested_rank_sampler(self, rank: int, seed: int) -> Callable[[], None]:
        """DyLoRA (Valipour et al. 2023): before each step, a rank b drawn uniformly from 1..rank and
        only the rank-b prefix used (and so trained), seeded per (run, round, client). The authors
        also rescale the prefix by rank/b; fedsb keeps one scale (fedsb.methods.ranks says why)."""
        rng = random.Random(seed)

        def sample() -> None:
            set_active_rank(self.model, rng.randint(1, rank))

        return sample

    def peak_memory(self) -> int | None:
        """Peak bytes allocated on this process's GPU since the last call (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        peak = int(torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def upload(self, rank: int | None = None) -> State:
        """What the client sends: the trained tensors (of its rank), float32 on the CPU (the wire's
        format)."""
        trained = extract_state(self.model, self.method.trained)
        return to_device(self.method.upload(trained, rank), torch.device("cpu"))

    def client_gradients(self, partition_id: int, ledger: PrivacyLedger | None = None
                         ) -> tuple[dict[str, torch.Tensor], int]:
        """A client's summed init gradient over up to init.num_samples of its examples, taken at the
        base model; with a privacy ledger, clipped, noised and charged
        (fedsb.training.privacy.private_init)."""
        self.reset_to_base()
        data = self.client_tokens(partition_id)
        n = min(self.config.method.init.num_samples, len(data["labels"]))
        if ledger is not None:
            from fedsb.training.privacy.private_init import privatize_init_gradient

            seed = hash_seed(self.config.seed, 0, partition_id)
            on_device = to_device(data, self.device)
            gradients = privatize_init_gradient(self.model, list(self.method.specs), on_device,
                                                self.config.method.init.num_samples, ledger, seed=seed)
        else:
            gradients = self._gradients(data, n)
        gradients = to_device(gradients, torch.device("cpu"))
        release_free_memory()
        return gradients, n

    def reset_to_base(self) -> None:
        """The base model itself: zero adapters and the head's initial weights."""
        adapters = extract_state(self.model, COMPONENTS)
        load_state(self.model, {**{k: torch.zeros_like(v) for k, v in adapters.items()}, **self.initial_head})

    @cached_property
    def computed_fixed_state(self) -> State:
        """The fixed tensors a client computes itself instead of receiving them: a local init's (OLoRA,
        PiSSA), from the pretrained weights every process holds, by the same seeded code as the server's
        initial_state, so every client and the server hold the same tensors. Empty for other inits."""
        if not self.method.init.local:
            return {}
        state = self.method.initial_state(self.model, torch.Generator().manual_seed(self.config.seed))
        return {k: v for k, v in to_device(state, torch.device("cpu")).items()
                if component_of(k) in self.method.fixed}

    def evaluate_client(self, partition_id: int, state: State) -> dict[str, float]:
        rank = self.client_rank(state)
        load_state(self.model, self.method.client_state(state, self.computed_fixed_state))
        with self.at_rank(rank):
            return evaluate(self.model, evaluation_batches(self.client_tokens(partition_id),
                                                           self.config.eval.batch_size))

    # -- server side -----------------------------------------------------------------------
    def _gradients(self, data: dict[str, torch.Tensor], num_samples: int) -> dict[str, torch.Tensor]:
        batches = iterate_batches(data, self.config.train.batch_size, shuffle=False)
        return accumulate_gradients(self.model, list(self.method.specs), batches, num_samples)

    @property
    def init_source(self) -> str | None:
        """Where the method's init gradients come from (method.init.source), or None: no such init."""
        return self.config.method.init.source if self.method.init_gradients else None

    def initial_state(self, client_gradients: list[dict[str, torch.Tensor]] | None = None) -> State:
        """The global state before round 1; a gradient-based init's gradients from the configured source."""
        self.reset_to_base()
        gradients = None
        source, n = self.init_source, self.config.method.init.num_samples
        if source == "server":
            gradients = self._gradients(self.tokens(self.data.server), n)
        elif source == "pooled":  # the paper's oracle: all clients' data in one place
            pooled = self.tokens(self.data.train)
            gradients = self._gradients(pooled, min(n, len(pooled["labels"])))
        elif source == "clients":
            if not client_gradients:
                raise ValueError("init.source=clients needs the clients' gradients")
            gradients = {k: sum(g[k] for g in client_gradients) for k in client_gradients[0]}
        generator = torch.Generator().manual_seed(self.config.seed)
        state = self.method.initial_state(self.model, generator, gradients, lr_eff=self.config.init_lr)
        state = to_device(state, torch.device("cpu"))  # the server's state lives on the CPU, in float32
        del gradients
        release_free_memory()  # the init's gradients and decompositions (LoRA-SB, LoRA-GA: 160 MB on MiniLM)
        return state

    def evaluate_global(self, state: State, split: str = "validation", rank: int | None = None
                        ) -> dict[str, float]:
        """The global state on the server's `validation` (every round) or `test` split; with `rank`,
        its adapter truncated to that rank (what a client of that rank holds)."""
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        load_state(self.model, state)
        tokens = self.validation_tokens if split == "validation" else self.test_tokens
        with self.at_rank(rank):
            return self._evaluate(tokens, split)

    def _evaluate(self, tokens: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        metrics = evaluate(self.model, evaluation_batches(tokens, self.config.eval.batch_size))
        if not self.generates:
            return metrics
        # A causal LM: `accuracy` is the exact match of its generated answers (the number a run reports
        # and chooses on); the teacher-forced loss, its perplexity and the next-token accuracy beside it.
        from fedsb.data.instructions import RESPONSE

        dataset = self.data.validation if split == "validation" else self.data.test
        e = self.config.eval
        generated = generation_accuracy(self.model, self.tokenizer, self.prompt_tokens(dataset),
                                        column(dataset, RESPONSE), batch_size=e.batch_size,
                                        max_new_tokens=e.max_new_tokens, style=e.answer_style)
        return {"loss": metrics["loss"], "perplexity": math.exp(min(metrics["loss"], 50.0)),
                "token_accuracy": metrics["accuracy"], "accuracy": generated["exact_match"],
                "examples": generated["examples"]}


def quiet_libraries() -> None:
    """No per-call progress bars or load reports from datasets/transformers in a run's log."""
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets reads it when imported
    if "datasets" in sys.modules:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()  # transformers 5's "Loading weights" bar, once per model


_WORKERS: dict[str, Worker] = {}


def get_worker(config: ExperimentConfig, run_dir: str | Path | None = None) -> Worker:
    """The process's Worker for this config (created on first use, then reused).

    A client process passes the run directory: if the server prepared the partitions' tokens
    there (fedsb.experiment.prepared), its Worker serves them without loading the data. (A Worker
    that has them still loads the data if asked for more, e.g. in a one-process run.)"""
    cache_key = json.dumps(config.to_dict(), sort_keys=True)
    if cache_key not in _WORKERS:
        _WORKERS.clear()  # one base model per process
        _WORKERS[cache_key] = Worker(config, read_prepared(run_dir, config.with_clients(AUTO_CLIENTS)))
    return _WORKERS[cache_key]
