"""The driver: Parquet in -> tensor-parallel groups -> Parquet out, resumable, exactly once.

Order of work: everything cheap is validated first (config, config.json, tp, tokenizer, every
input file's schema and ids, the output directory), then the groups start and load weights. Rows
stream from the input in bounded memory; each group holds a bounded number of rows in flight;
finished rows go to atomically written shards. A group that dies is rebuilt and its unfinished
rows re-run (bounded retries; a failed rebuild counts as a failure). Ctrl-C / SIGTERM flush
finished rows (never mid-shard) and leave a resumable directory; the pool is always shut down.
"""
from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa

from tqdm import tqdm

from internlm2_tp.config import ModelConfig, check_tp, with_task
from internlm2_tp.engine.cache_plan import RuntimeFacts
from internlm2_tp.errors import CheckpointError, JobConfigError, JobFailed, UserError
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.job_config import JobConfig, check_reward_generation
from internlm2_tp.runtime.data import storage
from internlm2_tp.runtime.dispatch import Dispatcher, JobStats
from internlm2_tp.runtime.data.input_types import InputColumns, InputRow
from internlm2_tp.runtime.interrupts import InterruptGuard
from internlm2_tp.runtime.data.io import plan_input
from internlm2_tp.runtime.metrics import JobMetrics
from internlm2_tp.runtime.data.output import OutputRow, ShardWriter, optional_columns
from internlm2_tp.runtime.data.output_dir import prepare_output_dir, write_manifest
from internlm2_tp.runtime.cluster.pool import Pool
from internlm2_tp.runtime.preflight import check_checkpoint
from internlm2_tp.runtime.data.rows import Request, error_row, finished_row, to_request
from internlm2_tp.runtime.data.sources import inputs_inside, would_read
from internlm2_tp.runtime.data.stream import iter_rows
from internlm2_tp.tokenizer import Tokenizer

if TYPE_CHECKING:
    from internlm2_tp.engine.engine import Finished

log = logging.getLogger(__name__)


def fingerprint(cfg: JobConfig, mcfg: ModelConfig, tok: Tokenizer | None = None,
                optional: tuple[str, ...] = (), lora_sha256: str | None = None) -> dict:
    """What makes two runs' outputs comparable; a resumed run must match it (`optional`: the
    output's optional columns, so every shard of a directory has one schema; `lora_sha256`:
    model.lora's adapter, its files' hash)."""
    cfg_sha = hashlib.sha256(Path(mcfg.source).read_bytes()).hexdigest()
    d = cfg.data
    data = {"input": storage.canonical(d.input), "id_column": d.id_column,
            "prompt_column": d.prompt_column, "messages_column": d.messages_column,
            "token_ids_column": d.token_ids_column}
    # Added keys appear only when set, so an output directory of an older version still resumes.
    data.update({k: v for k, v in (("carry_columns", list(d.carry_columns)), ("format", d.format))
                 if v not in ([], "auto")})
    if d.chat_template != "auto":   # the template's text too: an edited file changes the prompts
        text = tok.chat_template.text if tok is not None else None
        data["chat_template"] = {"setting": d.chat_template, "sha256": hashlib.sha256(
            text.encode()).hexdigest() if text is not None else None}
    model = {"path": str(Path(cfg.model.path).resolve()), "config_sha256": cfg_sha,
             "dtype": cfg.model.dtype}
    if cfg.model.task != "auto":
        model["task"] = cfg.model.task
    if cfg.model.lora:
        model["lora"] = {"path": str(Path(cfg.model.lora).resolve()), "sha256": lora_sha256}
    fp = {"model": model,
          "generation": _generation_fingerprint(cfg), "data": data}
    if optional:
        fp["output_columns"] = list(optional)
    return fp


# Generation keys added after outputs were first written: fingerprinted only when set.
_LATER_GENERATION_KEYS = {"n": 1, "logprobs": -1, "prompt_logprobs": False,
                          "json_schema": "", "regex": "", "choice": []}


def _generation_fingerprint(cfg: JobConfig) -> dict:
    g = asdict(cfg.generation)
    if g["json_schema"]:   # the schema's text: an edited .json file changes the completions
        g["json_schema"] = cfg.generation.sampling_params().json_schema
    return {k: v for k, v in g.items() if _LATER_GENERATION_KEYS.get(k, object()) != v}


class Job:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        d = cfg.data
        if not cfg.model.path:
            raise JobConfigError("model.path is required (an InternLM2 or Llama-layout HF checkpoint dir)")
        if not d.input:
            raise JobConfigError("data.input is required (a Parquet or JSON Lines file, directory "
                                 "or glob; a local path or URI)")
        if not d.output:
            raise JobConfigError("data.output is required (a directory or object-store prefix)")
        lora_sha = self._check_model()
        try:
            self.columns = InputColumns(d.id_column, d.prompt_column, d.messages_column,
                                        d.token_ids_column)
        except ValueError as e:
            raise JobConfigError(f"data.*_column: {e}") from e
        # job-level input errors: here (an unreachable store, bad credentials too)
        self.plan = plan_input(d.input, self.columns, d.carry_columns, d.format)
        self.out = storage.resolve(d.output, "data.output")
        inside = inputs_inside(self.plan, self.out)
        if inside:
            raise JobConfigError(f"data.output {d.output!r} contains input file {inside[0]}: the "
                                 "output shards would be read back as input; choose an output "
                                 "directory outside data.input")
        if would_read(d.input, self.out.child("part-x-00000.parquet")):
            raise JobConfigError(f"data.output {d.output!r} is inside data.input {d.input!r}: "
                                 "its shards would be read as input by the rerun; choose an "
                                 "output directory outside data.input")
        g = cfg.generation
        if self.reward_token is not None and self.plan.override_columns:
            raise JobConfigError(f"input column {self.plan.override_columns[0]!r} is a per-row "
                                 "generation setting, and a reward model generates nothing: "
                                 "drop or rename the column")
        self.optional = optional_columns(g.n, g.logprobs, g.prompt_logprobs,
                                         self.plan.override_columns,
                                         reward=self.reward_token is not None)
        samples = "sample_index" in self.optional
        done = prepare_output_dir(self.out, fingerprint(cfg, self.mcfg, self.tok, self.optional,
                                                        lora_sha),
                                  d.overwrite, with_samples=samples)
        # A reward row is scored at its prompt's end: the engine's max_new_tokens=0 path.
        self.base = (g.sampling_params() if self.reward_token is None
                     else SamplingParams(max_new_tokens=0))
        self.done_samples, self.done_ids = _done(done, g.n, "n" in self.plan.override_columns)
        self.todo = self.plan.num_rows - (len(self.done_ids) if self.done_ids is not None else 0)

    def _check_model(self) -> str | None:
        """The checkpoint's config, task, tp, weights (a dry load), LoRA adapter and tokenizer,
        each refused naming its culprit before any rank starts; model.lora's hash or None."""
        cfg, path = self.cfg, self.cfg.model.path
        self.mcfg = with_task(ModelConfig.from_dir(path), cfg.model.task)
        self.reward_token = self.mcfg.reward_token_id if self.mcfg.task == "reward" else None
        if self.reward_token is not None:
            check_reward_generation(cfg.generation)
        check_tp(self.mcfg, cfg.parallel.tp)
        check_checkpoint(path, self.mcfg)   # a dry load: names the file and tensor
        lora_sha = None
        if cfg.model.lora:   # checked against the checkpoint's shapes
            from internlm2_tp.checkpoint import CheckpointReader
            from internlm2_tp.lora import LoraAdapter
            lora_sha = LoraAdapter(cfg.model.lora, self.mcfg.layout,
                                   CheckpointReader(path)).sha256()
        self.tok = Tokenizer.from_dir(path, cfg.data.chat_template)   # compiles the template
        if self.tok.vocab_size > self.mcfg.vocab_size:
            raise CheckpointError(f"{path}: tokenizer.model has {self.tok.vocab_size} "
                                  f"pieces but config.json vocab_size is {self.mcfg.vocab_size}")
        return lora_sha

    def _rows(self) -> Iterator[InputRow]:
        for batch in iter_rows(self.plan, self.columns, self.cfg.data.batch_rows, self.done_ids):
            yield from batch

    def _prepare(self, row: InputRow) -> Request | list[OutputRow]:
        return to_request(row, self.tok, self.base, self.mcfg.vocab_size,
                          self.done_samples.get(row.id, ()), self.reward_token)

    def run(self, pool: Pool) -> dict:
        """Run every row not yet in the output. Whatever happens (a group lost for good, bad
        input found mid-stream, Ctrl-C, SIGTERM), finished rows are flushed to whole shards and
        the pool is shut down; the directory stays resumable."""
        cfg, t0 = self.cfg, time.time()
        log.info("%d rows in %d file(s); %d already done in %s; %d to run",
                 self.plan.num_rows, len(self.plan.files), self.plan.num_rows - self.todo,
                 self.out.uri, self.todo)
        writer = ShardWriter(self.out, self.plan.id_type, cfg.data.shard_rows,
                             carry=self.plan.carry_schema, optional=self.optional)
        bar = tqdm(total=self.todo * self.base.n, unit="row", file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 10)
        guard = InterruptGuard()
        with guard:
            try:
                facts, stats, figures = self._loop(pool, writer, bar, guard, t0)
            except Exception:
                guard.check()   # a Ctrl-C / SIGTERM that surfaced as another error inside Ray
                raise
            finally:
                with guard.critical(reraise=False):
                    try:
                        writer.close()   # finished rows, as whole shards
                    finally:             # even if that write failed (e.g. a full disk)
                        bar.close()
                        _shutdown(pool)
        wall = time.time() - t0
        manifest = {"rows_total": self.plan.num_rows, "rows_this_run": stats.rows,
                    "rows_done_before": self.plan.num_rows - self.todo, **asdict(stats),
                    "wall_s": round(wall, 3),
                    "rows_per_s": round(stats.rows / wall, 3),
                    "output_tokens_per_s": round(stats.completion_tokens / wall, 3),
                    **figures.manifest(),
                    "shards_written": list(writer.files),
                    "memory_plan": asdict(facts), "config": self.cfg.to_dict()}
        write_manifest(self.out, manifest)
        return manifest

    def _start(self, pool: Pool) -> RuntimeFacts:
        try:
            facts = pool.start()
        except (JobFailed, UserError):  # a bad checkpoint found by a rank: exit code 2
            raise
        except Exception as e:  # noqa: BLE001 - placement, actor start, rendezvous, load
            raise JobFailed(f"the tensor-parallel group(s) could not start: {e}") from e
        return facts[0]["facts"]

    def _loop(self, pool: Pool, writer: ShardWriter, bar: tqdm, guard: InterruptGuard,
              t0: float) -> tuple[RuntimeFacts, JobStats, JobMetrics]:
        facts = self._start(pool)
        log.info("memory plan per rank: %s", facts.describe())
        cfg = self.cfg

        def output(f: Finished) -> OutputRow:
            if f.error:
                return error_row(f.request_id, f.error, f.prompt_tokens, f.sample_index)
            return finished_row(f.request_id, f.prompt_tokens, f.output_ids, f.finish_reason,
                                f.stop_text, self.tok, facts.eos_ids, sample_index=f.sample_index,
                                token_logprobs=f.token_logprobs, top_logprobs=f.top_logprobs,
                                prompt_token_logprobs=f.prompt_logprobs, reward=f.reward)

        run = Dispatcher(pool, self._rows(), self._prepare, output, writer, bar, guard,
                         cap=cfg.ray.inflight_per_group or 2 * cfg.engine.max_num_seqs,
                         max_restarts=cfg.ray.max_group_restarts, t0=t0,
                         metrics=JobMetrics(pool.num_groups, pool.metrics_sink(self.out.uri)))
        return facts, run.run(), run.metrics


def _done(done: pa.Array | None, n: int, per_row_n: bool
          ) -> tuple[dict[Any, set[int]], pa.Array | None]:
    """From what the output holds: (row id -> sample indices written, for rows that may still
    miss some; the ids the reader skips). Without samples every written id is done. With them
    a row is skipped when all its job-level n samples are in, and with a per-row `n` column
    none is skipped up front: each row's own n decides, as it is read."""
    if done is None or not pa.types.is_struct(done.type):
        return {}, done
    written: dict[Any, set[int]] = {}
    for rid, i in zip(done.field("id").to_pylist(), done.field("sample_index").to_pylist()):
        written.setdefault(rid, set()).add(i)
    if per_row_n:
        return written, None
    full = [rid for rid, have in written.items() if len(have.intersection(range(n))) == n]
    partial = {rid: have for rid, have in written.items() if len(have.intersection(range(n))) < n}
    return partial, pa.array(full, done.field("id").type) if full else None


def _shutdown(pool: Pool) -> None:
    try:
        pool.shutdown()
    except Exception as e:  # noqa: BLE001 - the job's own outcome matters more
        log.warning("pool shutdown: %s", e)

