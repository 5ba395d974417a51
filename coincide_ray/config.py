"""The typed job configuration: one JobConfig composed of per-stage parts.

A YAML file and command-line flags map to the same object; flags override the file.
Every check raises ConfigError with one line that names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


def _fail_unless(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class EmbedConfig:
    # Records per input block = per embeddings/part-*.parquet file. A block's records are
    # sorted by length into batches: the larger the block, the closer the neighbours.
    block_records: int = 256
    batch_size: int = 64  # records per forward pass at most
    batch_tokens: int = 8192  # padded tokens per forward pass at most (rows x the longest); 0 = no limit
    # Where the model runs. auto = gpu when the cluster has GPUs now or its autoscaler can add
    # nodes that have them, else cpu. With gpu every model actor asks Ray for gpus_per_actor
    # GPUs and the run waits (wait_for_resources_s at most) for the first of them to join.
    device: str = "auto"
    gpus_per_actor: float = 1.0
    wait_for_resources_s: float = 900.0  # a GPU node started from zero takes minutes to boot
    # Model actors. 0 = autoscale from 1 up to max_actors as GPUs arrive (one CPU actor using
    # every core on a cluster without GPUs); N = exactly N, waiting for room for all of them.
    actors: int = 0
    max_actors: int = 0  # 0 = the GPUs the cluster has or its autoscaler can add, / gpus_per_actor
    prepare_workers: int = 0  # CPU workers decoding and tokenising; 0 = the CPUs the model actors leave
    max_image_pixels: int = 50_000_000  # larger images are rejected (decompression bombs)
    dtype: str = "auto"  # the model's weights: auto = bfloat16 on GPUs that have it (else float16), float32 on CPU
    # How the vectors are stored: float16 as the paper's authors do (half the bytes to write,
    # read and hold; LLaVA-665K at D = 20,480 is 27 GB), or float32.
    vector_dtype: str = "float16"
    trust_remote_code: bool = False  # run Python shipped with the checkpoint: only for checkpoints you trust
    model_cache: str = "~/.cache/coincide-ray/models"  # where s3:// checkpoints are copied, once per node

    def validate(self) -> None:
        _fail_unless(self.block_records >= 1, f"embed.block_records must be at least 1, got {self.block_records}")
        _fail_unless(self.batch_size >= 1, f"embed.batch_size must be at least 1, got {self.batch_size}")
        _fail_unless(self.batch_tokens >= 0, f"embed.batch_tokens must be non-negative, got {self.batch_tokens}")
        _fail_unless(self.actors >= 0, f"embed.actors must be non-negative, got {self.actors}")
        _fail_unless(self.max_actors >= 0, f"embed.max_actors must be non-negative, got {self.max_actors}")
        devices = ("auto", "gpu", "cpu")
        _fail_unless(self.device in devices, f"embed.device must be one of {', '.join(devices)}, got {quoted(self.device)}")
        _fail_unless(self.gpus_per_actor > 0, f"embed.gpus_per_actor must be positive, got {self.gpus_per_actor}")
        _fail_unless(self.wait_for_resources_s >= 0,
                     f"embed.wait_for_resources_s must be non-negative, got {self.wait_for_resources_s}")
        _fail_unless(self.prepare_workers >= 0, f"embed.prepare_workers must be non-negative, got {self.prepare_workers}")
        _fail_unless(self.max_image_pixels >= 1, f"embed.max_image_pixels must be positive, got {self.max_image_pixels}")
        dtypes = ("auto", "float32", "bfloat16", "float16")
        _fail_unless(self.dtype in dtypes, f"embed.dtype must be one of {', '.join(dtypes)}, got {quoted(self.dtype)}")
        stored = ("float16", "float32")
        _fail_unless(self.vector_dtype in stored,
                     f"embed.vector_dtype must be one of {', '.join(stored)}, got {quoted(self.vector_dtype)}")


@dataclass(frozen=True)
class ClusterConfig:
    clusters: int = 1000  # K; the paper uses 10,000 for LLaVA-665K and 2,500 for Vision-Flan-191K
    iterations: int = 50  # Lloyd iterations
    seed: int = 1234
    # Fit the centroids on this share of the rows (seeded), then assign every row: faster for
    # large K at some cost in objective; 1.0 fits on all rows, as the paper does.
    sample_fraction: float = 1.0
    workers: int = 0  # shard workers holding the embeddings; 0 = one per node that has CPUs
    # auto: a shard worker on a node with GPUs takes one and keeps its rows there (float16 as
    # stored), products accumulated in float32; cpu: rows and arithmetic stay on the CPU.
    device: str = "auto"
    # Start from the previous run's centroids (with `previous`, same K and dimension) instead
    # of a seeded draw: steadier clusters night to night, but the result then depends on
    # the history of runs, not only on this run's inputs.
    warm_start: bool = False

    def validate(self) -> None:
        _fail_unless(0.0 < self.sample_fraction <= 1.0,
                     f"cluster.sample_fraction must lie in (0, 1], got {self.sample_fraction}")
        _fail_unless(self.workers >= 0, f"cluster.workers must be non-negative, got {self.workers}")
        _fail_unless(self.device in ("auto", "cpu"), f"cluster.device must be auto or cpu, got {quoted(self.device)}")
        _fail_unless(self.clusters >= 1, f"cluster.clusters must be at least 1, got {self.clusters}")
        _fail_unless(self.iterations >= 0, f"cluster.iterations must be non-negative, got {self.iterations}")
        _fail_unless(0 <= self.seed < 2**63, f"cluster.seed must lie in [0, 2^63), got {self.seed}")


@dataclass(frozen=True)
class SelectConfig:
    fraction: float = 0.2  # budget = int(fraction * accepted records)
    temperature: float = 0.1  # tau of the softmax over cluster scores
    sigma: float = 1.0  # Gaussian kernel width for density and MMD
    similarity_mask: float = 0.9  # centroid pairs above this cosine are ignored in transferability
    kernel_memory_mb: int = 512  # clusters whose kernel is larger are processed blockwise
    # Alternative subsets from the same clusters and rankings, each under selection/<name>/:
    # coincide, random, no-transfer, no-density, uniform, coincide-random-within (the paper's
    # ablations; coincide_ray/select/strategies.py). selection/selection.parquet is always COINCIDE's.
    strategies: tuple[str, ...] = ()

    def validate(self) -> None:
        _fail_unless(0.0 <= self.fraction <= 1.0, f"select.fraction must lie in [0, 1], got {self.fraction}")
        _fail_unless(self.temperature > 0, f"select.temperature must be positive, got {self.temperature}")
        _fail_unless(self.sigma > 0, f"select.sigma must be positive, got {self.sigma}")
        _fail_unless(self.kernel_memory_mb >= 1, f"select.kernel_memory_mb must be at least 1, got {self.kernel_memory_mb}")
        from coincide_ray.select.strategies import STRATEGIES

        unknown = [name for name in self.strategies if name not in STRATEGIES]
        _fail_unless(not unknown, f"select.strategies: unknown strategy {', '.join(map(repr, unknown))}; "
                                  f"choose from {', '.join(STRATEGIES)}")
        _fail_unless(len(set(self.strategies)) == len(self.strategies), "select.strategies names a strategy twice")


@dataclass(frozen=True)
class JobConfig:
    output: str  # local folder or s3:// prefix that receives every stage's outputs
    input: str | None = None  # records: LLaVA JSON list, JSON Lines or Parquet (file or folder)
    image_root: str | None = None  # folder or s3:// prefix that record image paths are relative to
    model: str | None = None  # image-text-to-text checkpoint folder (local or s3://), safetensors
    embeddings: str | None = None  # Parquet file or folder with sample_id, embedding
    # A finished earlier run (its output folder): records whose fingerprint it embedded are
    # reused instead of recomputed, and the selection is compared with its selection.
    previous: str | None = None
    # Record fields holding known labels (e.g. the demo's concept, skill): the report then
    # shows cluster purity and how the selection covers the label groups.
    label_fields: tuple[str, ...] = ()
    # A finished run (its output folder) whose figures the report shows beside this run's:
    # cluster purity, collapsed centroid pairs and label coverage (the demo compares a trained
    # reference model with a random-weight one this way).
    compare_with: str | None = None
    # Decoder layers whose o_proj outputs are pooled. None: the paper's choice (3, 7, 11, 15, 19
    # of 24 layers) at the same relative depths of the checkpoint's decoder; `select` then
    # takes the layers recorded with the embeddings.
    layers: tuple[int, ...] | None = None
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    @property
    def num_layers(self) -> int:
        if self.layers is None:
            raise ConfigError("layers are not known: give --layers")
        return len(self.layers)

    def validate(self) -> "JobConfig":
        _fail_unless(bool(self.output), "output must be given")
        if self.layers is not None:
            layers = self.layers
            _fail_unless(len(layers) > 0, "layers must name at least one decoder layer")
            _fail_unless(all(layer >= 0 for layer in layers), f"layers must be non-negative, got {layers}")
            _fail_unless(len(set(layers)) == len(layers), f"layers must not repeat, got {layers}")
            _fail_unless(list(layers) == sorted(layers), f"layers must be in ascending order, got {layers}")
        self.embed.validate()
        self.cluster.validate()
        self.select.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobConfig":
        """Build from nested plain values (a parsed YAML file merged with flags)."""
        values = dict(values)
        parts = {"embed": EmbedConfig, "cluster": ClusterConfig, "select": SelectConfig}
        for name, part in parts.items():
            section = values.pop(name, None) or {}
            _fail_unless(isinstance(section, dict), f"{name} must be a mapping of keys")
            if name == "select" and "strategies" in section:
                section = dict(section, strategies=_names(section["strategies"], "select.strategies"))
            values[name] = _build(part, section, prefix=f"{name}.")
        if "layers" in values:
            values["layers"] = parse_layers(values["layers"])
        if "label_fields" in values:
            values["label_fields"] = _names(values["label_fields"], "label_fields")
        return _build(cls, values, prefix="").validate()


def _names(value: Any, key: str) -> tuple[str, ...]:
    """'a,b' or [a, b] -> ('a', 'b')."""
    names = value.split(",") if isinstance(value, str) else value
    _fail_unless(isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names),
                 f"{key} must be names, got {quoted(value)}")
    return tuple(names)


def parse_layers(value: Any) -> tuple[int, ...]:
    """'3,7,11' or [3, 7, 11] -> (3, 7, 11)."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(int(item) for item in items)
    except (TypeError, ValueError):
        raise ConfigError(f"layers must be comma-separated integers, got {quoted(value)}") from None


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    _fail_unless(not unknown, f"unknown configuration key(s): {', '.join(prefix + k for k in unknown)}")
    converted = {}
    for name, value in values.items():
        kind = fields[name].type  # a string: annotations are postponed
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "int" and not (numeric and float(value).is_integer()):
            raise ConfigError(f"{prefix}{name} must be an integer, got {quoted(value)}")
        if kind == "float" and not numeric:
            raise ConfigError(f"{prefix}{name} must be a number, got {quoted(value)}")
        if kind in ("str", "str | None") and not isinstance(value, str) and not (kind != "str" and value is None):
            raise ConfigError(f"{prefix}{name} must be a string, got {quoted(value)}")
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{prefix}{name} must be true or false, got {quoted(value)}")
        converted[name] = {"int": int, "float": float}.get(kind, lambda v: v)(value)
    try:
        return cls(**converted)
    except TypeError as error:  # a required key is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'job'}: {error}") from None


MAX_CONFIG_VALUES = 100_000  # a job config is a few dozen keys; YAML aliases can make billions


def quoted(value: Any, limit: int = 120) -> str:
    """A value for an error message: its repr, shortened at every level (reprlib) and cut
    at `limit` characters, so that a huge value never floods the terminal."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxtuple, short.maxstring, short.maxother = 3, 6, 6, 6, 60, 60
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_values(values: Any, limit: int) -> int:
    """How many values `values` holds, walked as the tree YAML aliases expand into; stops
    counting past `limit`, so an alias bomb costs no more than `limit` steps."""
    seen, stack = 0, [values]
    while stack and seen <= limit:
        value = stack.pop()
        seen += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return seen


def load_yaml(uri_text: str) -> dict[str, Any]:
    """Parse a YAML config file's text into nested plain values."""
    try:
        values = yaml.safe_load(uri_text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file is not valid YAML: {quoted(str(error).splitlines()[0], 200)}") from None
    _fail_unless(isinstance(values, dict), "config file must hold a mapping of keys")
    _fail_unless(count_values(values, MAX_CONFIG_VALUES) <= MAX_CONFIG_VALUES,
                 f"config file expands to more than {MAX_CONFIG_VALUES:,} values (nested YAML aliases?); "
                 "a job config holds a few dozen keys")
    return values


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested merge; override values that are None are ignored (flags not given)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged[key] = merge(merged.get(key) or {}, value)
        elif value is not None:
            merged[key] = value
    return merged
