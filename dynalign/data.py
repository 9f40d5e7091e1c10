"""Training prompts: loaded from a JSONL or Parquet file with ``datasets``, served in seeded order."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from dynalign.batch import chat_token_ids
from dynalign.config import ConfigError, TrainConfig
from dynalign.files import JsonlError, iter_jsonl

log = logging.getLogger(__name__)


@dataclass
class PromptStream:
    """Prompts as (id, text) pairs, reshuffled each pass; its state is what a checkpoint keeps."""

    prompts: list[tuple[str, str]]
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    skipped_too_long: int = 0
    order: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.order:
            self.order = self._order_for(self.epoch)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[tuple[str, str]]:
        taken = []
        while len(taken) < count:
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._order_for(self.epoch)
            taken.append(self.prompts[self.order[self.position]])
            self.position += 1
        return taken

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.order = self._order_for(self.epoch)


def load_prompts(config: TrainConfig) -> PromptStream:
    """Read, validate and length-filter the prompts file named by ``data.prompts_path``."""
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" on every load is chatter, not progress
    data = config.data
    path = Path(data.prompts_path)
    suffix = path.suffix.lower()
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if not path.is_file():
        raise ConfigError(f"data.prompts_path = '{path}': no such file; give a JSONL or Parquet file of prompts")
    if suffix not in kinds:
        raise ConfigError(f"data.prompts_path = '{path}': unsupported file type '{suffix}'; use .jsonl or .parquet")
    if suffix != ".parquet" and not path.read_text(errors="replace").strip():
        raise ConfigError(f"data.prompts_path = '{path}': the file holds no prompts")
    if suffix == ".jsonl":
        _check_json_lines(path)
    try:
        rows = datasets.load_dataset(kinds[suffix], data_files=str(path), split="train")
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"data.prompts_path = '{path}': could not be read ({first_line}); "
                          "each line must be a JSON object") from None
    if len(rows) == 0:
        raise ConfigError(f"data.prompts_path = '{path}': the file holds no prompts")
    if data.prompt_key not in rows.column_names:
        raise ConfigError(f"data.prompt_key = '{data.prompt_key}': no such column in {path}; "
                          f"columns are {', '.join(rows.column_names)}")
    ids = rows[data.id_key] if data.id_key in rows.column_names else [str(i) for i in range(len(rows))]
    prompts = [(str(i), str(p)) for i, p in zip(ids, rows[data.prompt_key]) if p is not None and str(p).strip()]
    prompts, skipped = _drop_long(prompts, config)
    if not prompts:
        raise ConfigError(f"data.prompts_path = '{path}': no usable prompt (empty or longer than "
                          f"data.max_prompt_tokens = {data.max_prompt_tokens})")
    if len(prompts) < data.prompts_per_iteration and not config.generation.enabled:
        log.warning("data.prompts_path = '%s': %d usable prompt(s) (%d over data.max_prompt_tokens = %d) for "
                    "data.prompts_per_iteration = %d; prompts repeat within an iteration", path, len(prompts), skipped,
                    data.max_prompt_tokens, data.prompts_per_iteration)
    return PromptStream(prompts, seed=config.seed, shuffle=data.shuffle, skipped_too_long=skipped)


def _check_json_lines(path: Path) -> None:
    """One JSON object per line, or a one-line error with the (1-based) line number."""
    try:
        for number, row in iter_jsonl(path, cut_last_line_ok=False):
            if not isinstance(row, dict):
                raise ConfigError(f"data.prompts_path = '{path}': line {number} is a JSON {type(row).__name__}, "
                                  "not an object; each line must be one JSON object such as {\"prompt\": \"...\"}")
    except JsonlError as err:
        raise ConfigError(f"data.prompts_path = '{path}': {err.reason}; each line must be one JSON object") from None


def _drop_long(prompts: list[tuple[str, str]], config: TrainConfig) -> tuple[list[tuple[str, str]], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    if not tokenizer.chat_template:
        raise ConfigError(f"model.path = '{config.model.path}': the tokenizer has no chat template; "
                          "add one to tokenizer_config.json")
    limit = config.data.max_prompt_tokens
    kept = []
    for prompt_id, text in prompts:
        length = len(chat_token_ids(tokenizer, [{"role": "user", "content": text}]))
        if length <= limit:
            kept.append((prompt_id, text))
        elif config.data.on_long_prompt == "error":
            raise ConfigError(f"prompt '{prompt_id}' is {length} tokens, over data.max_prompt_tokens = {limit}; "
                              "raise the limit or set data.on_long_prompt=skip")
    return kept, len(prompts) - len(kept)
