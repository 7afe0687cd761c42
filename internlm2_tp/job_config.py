"""The batch job's configuration: OmegaConf structured sections, one per component.

`load_job_config(yaml_path, overrides)` merges conf/batch_infer.yaml and `key=value` overrides
(OmegaConf dotlist) onto the schema: unknown keys and wrong types are refused naming the key.
Each component receives only its own section. Each value is checked by the rule its component
keeps (engine/config.py, engine/params.py, config.py, parallel/kinds.py), all torch-free: loading
and validating the job's configuration imports no torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from internlm2_tp.config import check_dtype_setting, check_task_setting
from internlm2_tp.engine.config import EngineConfig
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.errors import JobConfigError
from internlm2_tp.parallel.kinds import check_device


@dataclass
class ModelSection:
    path: str = ""          # HF checkpoint dir (InternLM2 or Llama layout); "" runs the demo
    dtype: str = "auto"     # auto, float32, bfloat16, float16
    task: str = "auto"      # auto (from architectures), generate, reward
    lora: str = ""          # a PEFT LoRA adapter directory, merged into the weights at load

    def __post_init__(self) -> None:
        check_dtype_setting(self.dtype)
        check_task_setting(self.task)


@dataclass
class ParallelSection:
    tp: int = 1             # tensor-parallel degree (ranks per group)
    replicas: int = 1       # data-parallel tensor-parallel groups
    device: str = "auto"    # auto, npu, cuda, cpu
    timeout_s: float = 600.0  # rendezvous + collective timeout (torch); bounds a hung rank
    hccl_connect_timeout: int = 120   # HCCL_CONNECT_TIMEOUT (s), Ascend only
    hccl_exec_timeout: int = 1836     # HCCL_EXEC_TIMEOUT (s), Ascend only
    hccl_if_ip: str = ""              # HCCL_IF_IP: host NIC for HCCL rendezvous ("" = HCCL's choice)
    hccl_buffsize: int = 200          # HCCL_BUFFSIZE (MB per communicator)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise JobConfigError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.replicas < 1:
            raise JobConfigError(f"parallel.replicas must be >= 1, got {self.replicas}")
        check_device(self.device)
        if self.timeout_s <= 0:
            raise JobConfigError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")
        if not 120 <= self.hccl_connect_timeout <= 7200:
            raise JobConfigError("parallel.hccl_connect_timeout must be within [120, 7200] s, got "
                                 f"{self.hccl_connect_timeout}")

    def hccl_env(self) -> dict[str, str]:
        env = {"HCCL_CONNECT_TIMEOUT": str(self.hccl_connect_timeout),
               "HCCL_EXEC_TIMEOUT": str(self.hccl_exec_timeout),
               "HCCL_BUFFSIZE": str(self.hccl_buffsize)}
        if self.hccl_if_ip:
            env["HCCL_IF_IP"] = self.hccl_if_ip
        return env


@dataclass
class DataSection:
    input: str = ""                       # path or URI (s3://, gs://, hdfs://, file://): file, dir or glob
    output: str = ""                      # output directory or prefix, local path or URI
    id_column: str = "id"                 # row number when the column is absent
    prompt_column: str = "prompt"
    messages_column: str = "messages"
    token_ids_column: str = "prompt_token_ids"
    batch_rows: int = 256                 # rows read from the input at a time
    shard_rows: int = 1000                # rows per output shard
    overwrite: bool = False               # reuse an output dir written with another config
    carry_columns: list[str] = field(default_factory=list)   # input columns copied to the output; ["*"]: all
    format: str = "auto"                  # auto (by extension), parquet, json (JSON Lines)
    chat_template: str = "auto"           # auto (the checkpoint's, else built-in), builtin, or a Jinja file

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise JobConfigError(f"data.batch_rows must be >= 1, got {self.batch_rows}")
        if self.shard_rows < 1:
            raise JobConfigError(f"data.shard_rows must be >= 1, got {self.shard_rows}")
        if self.format not in ("auto", "parquet", "json"):
            raise JobConfigError(f"data.format must be auto, parquet or json; got {self.format!r}")
        c = list(self.carry_columns)
        if any(not isinstance(x, str) or not x for x in c) or len(set(c)) != len(c):
            raise JobConfigError(f"data.carry_columns must be distinct non-empty names, got {c}")
        if not self.chat_template.strip():
            raise JobConfigError("data.chat_template must be auto, builtin, or the path of a Jinja "
                                 "template file; got ''")
        if "*" in c and c != ["*"]:
            raise JobConfigError(f"data.carry_columns: '*' (every input column) stands alone, got {c}")


@dataclass
class GenerationSection:
    max_new_tokens: int = 256
    temperature: float = 0.0              # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                        # 0: off
    repetition_penalty: float = 1.0
    seed: int = 0                         # each row's seed is derived from this and its id
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)          # stop strings, cut from the text
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1                            # samples per row (temperature > 0); adds sample_index
    logprobs: int = -1                    # >= 0 adds token_logprobs; K > 0 adds top_logprobs
    prompt_logprobs: bool = False         # adds prompt_token_logprobs (max_new_tokens=0: scoring)
    json_schema: str = ""                 # structured output: a JSON Schema (inline JSON or a .json file)
    regex: str = ""                       # structured output: the completion matches this regex
    choice: list[str] = field(default_factory=list)        # structured output: one of these

    def __post_init__(self) -> None:
        try:
            params = self.sampling_params()
        except ValueError as e:  # name the setting the user wrote, not the engine's class
            msg = str(e).replace("SamplingParams.", "generation.")
            raise JobConfigError(msg.replace("SamplingParams: ", "generation: ")) from e
        if params.constraint is not None:   # compiled now: a bad one stops before any load
            from internlm2_tp.engine.grammar import constraint_error
            kind, value = params.constraint
            err = constraint_error(kind, value)
            if err:
                raise JobConfigError(f"generation.{kind} does not compile: {err}")

    def sampling_params(self) -> SamplingParams:
        """The job's sampling parameters (the fields are SamplingParams' own); json_schema read
        from its file when it names one."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["json_schema"] = _schema_text(self.json_schema)
        return SamplingParams(**values)


def _schema_text(value: str) -> str:
    """generation.json_schema as JSON text: inline (it starts with '{'), else a file's."""
    if not value.strip() or value.lstrip().startswith("{"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise JobConfigError(f"generation.json_schema: {value!r} is neither inline JSON (an object "
                             "starting with '{') nor an existing .json file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JobConfigError(f"generation.json_schema: cannot read {path} ({e})") from None


def check_reward_generation(g: GenerationSection) -> None:
    """A reward job scores each row and generates nothing: every generation.* key but
    max_new_tokens (ignored) must keep its default, so no setting is silently dropped."""
    base = GenerationSection()
    keys = [f"generation.{f.name}" for f in fields(g)
            if f.name != "max_new_tokens" and getattr(g, f.name) != getattr(base, f.name)]
    if keys:
        raise JobConfigError(f"{', '.join(keys)}: a reward model scores each row and generates "
                             "nothing, so generation settings do not apply; unset them")


@dataclass
class RaySection:
    address: str = ""                     # "" : the cluster of `ray job submit`, else a local one
    max_group_restarts: int = 3           # rebuilds of a dead tensor-parallel group before failing
    cpus_per_worker: float = 0.0        # 0: cpu ranks share the cores; 1 on devices
    inflight_per_group: int = 0           # rows queued per group; 0: 2 x engine.max_num_seqs
    connect_timeout_s: float = 30.0       # an existing cluster must answer within this

    def __post_init__(self) -> None:
        if self.max_group_restarts < 0:
            raise JobConfigError("ray.max_group_restarts must be >= 0")
        if self.connect_timeout_s <= 0:
            raise JobConfigError(f"ray.connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        # A negative queue would feed no group at all: the job would "finish" with no row done.
        for name in ("cpus_per_worker", "inflight_per_group"):
            if getattr(self, name) < 0:
                raise JobConfigError(f"ray.{name} must be >= 0 (0: automatic), "
                                     f"got {getattr(self, name)}")


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: RaySection = field(default_factory=RaySection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_job_config(yaml_path: str | Path | None, overrides: list[str]) -> JobConfig:
    schema = OmegaConf.structured(JobConfig)
    try:
        layers = [schema]
        if yaml_path is not None:
            layers.append(OmegaConf.load(str(yaml_path)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise JobConfigError(f"override {bad[0]!r} is not key=value")
        for o in overrides:   # a value YAML cannot parse, e.g. data.carry_columns=[*]
            try:
                OmegaConf.from_dotlist([o])
            except OmegaConfBaseException:
                pass
            except Exception as e:  # noqa: BLE001 - yaml's own errors
                raise JobConfigError(f"override {o!r}: the value does not parse ({' '.join(str(e).split())}); "
                                     "quote it, e.g. 'data.carry_columns=[\"*\"]'") from None
        layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(*layers)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise JobConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from e
    except (ValueError, TypeError) as e:
        if isinstance(e, JobConfigError):
            raise
        raise JobConfigError(str(e)) from e
    assert isinstance(obj, JobConfig)
    return obj

