"""Hugging Face model classes over compiled programs: the Optimum interface of optimum-disc.

Each class wraps one :class:`~optimum_disc.compiler.CompiledModel` and behaves like the
transformers model it was compiled from: same keyword call, same ``ModelOutput``, ``.config``,
``.device``, ``.to(device)``, and it works in transformers' pipelines.

Example:
    >>> import tempfile, torch, transformers
    >>> from optimum_disc import DiscModelForSequenceClassification
    >>> config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    >>> checkpoint = tempfile.mkdtemp()
    >>> transformers.BertForSequenceClassification(config).save_pretrained(checkpoint)
    >>> model = DiscModelForSequenceClassification.from_pretrained(checkpoint, export=True,
    ...     device="cpu")
    >>> model(input_ids=torch.tensor([[2, 5, 7, 3]])).logits.shape
    torch.Size([1, 2])
    >>> saved = tempfile.mkdtemp()
    >>> model.save_pretrained(saved)  # the compiled artifact: no re-export when loading it
    >>> DiscModelForSequenceClassification.from_pretrained(saved, device="cpu").config.num_labels
    2
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from pathlib import Path

import numpy as np
import torch
from optimum.modeling_base import OptimizedModel
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.pipelines import Pipeline

from optimum_disc import artifact
from optimum_disc.settings import DiscSettings

logger = logging.getLogger(__name__)

_SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(DiscSettings))
# The settings a compiled program depends on; the others are choices of the runtime.
_COMPILE_TIME_SETTINGS = ("precision",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_DTYPE_TO_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _normalize_device(device) -> torch.device:
    if isinstance(device, int):
        device = torch.device("cuda", device) if device >= 0 else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a device; pass 'cuda', 'cuda:1', 'cpu' or a torch.device."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r} needs a CUDA GPU and none is available; pass device='cpu'."
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class DiscModel(OptimizedModel):
    """A compiled encoder with the Optimum interface; also the feature-extraction model.

    The task heads (``DiscModelForSequenceClassification``...) are thin subclasses that name
    their transformers ``AutoModel`` class, their pipeline task and the loss of their labels.

    Use :meth:`from_pretrained` to build one, from a transformers checkpoint (``export=True``)
    or from a folder / Hub repository that holds a saved compiled artifact.

    Attributes:
        model: the :class:`~optimum_disc.compiler.CompiledModel` that runs.
        config: the transformers configuration.
        preprocessors: the tokenizer(s) found with the model, saved with it.
        artifact_manifest: the manifest of the artifact it was loaded from (empty after export).
    """

    auto_model_class = AutoModel
    task = "feature-extraction"
    main_input_name = "input_ids"
    base_model_prefix = "disc_model"
    input_modalities = ("text",)
    # The dict of transformers' model-class names whose pipelines check the model's class.
    _transformers_names: str | None = None

    def __init__(
        self,
        model,
        config: PretrainedConfig,
        preprocessors: list | None = None,
        *,
        artifact_manifest: dict | None = None,
    ):
        super().__init__(model=model, config=config, preprocessors=preprocessors)
        self.artifact_manifest = dict(artifact_manifest or {})

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike,
        config: PretrainedConfig | None = None,
        export: bool = False,
        subfolder: str = "",
        revision: str | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        token: bool | str | None = None,
        *,
        device: str | torch.device | int | None = None,
        settings: DiscSettings | None = None,
        **kwargs,
    ):
        """Load a compiled model, or compile a transformers checkpoint.

        Args:
            model_id: a local folder, or a Hub repository id (``"org/name"``, resolved through
                the Hugging Face cache, offline too). It holds either a compiled artifact
                (written by :meth:`save_pretrained`) or a transformers checkpoint.
            config: a configuration to use instead of the folder's ``config.json``.
            export: compile the transformers checkpoint at ``model_id``. With ``False`` (the
                default) a saved artifact is loaded; where there is none, the checkpoint is
                compiled anyway and a warning says so (as optimum-onnx does): save the result
                with :meth:`save_pretrained` to skip compiling next time.
            subfolder, revision, force_download, local_files_only, trust_remote_code,
                cache_dir, token: as in transformers' ``from_pretrained``.
            device: where the model runs: ``"cuda"`` (the default when a GPU is available),
                ``"cuda:1"``, ``"cpu"``...
            settings: a :class:`~optimum_disc.DiscSettings`; keyword arguments named like its
                fields (``precision="fp16"``, ``cuda_graphs=False``...) apply on top. When
                loading an artifact, ``precision`` must be the one it was compiled with; the
                other settings are runtime choices and may change.
            dtype: ``torch.float16`` / ``torch.bfloat16`` / ``torch.float32`` as another
                spelling of ``precision``.

        Returns:
            An instance of this class.
        """
        overrides = cls._settings_overrides(kwargs)
        if kwargs:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) "
                f"{sorted(kwargs)}; it takes the transformers loading arguments (revision, token, "
                "cache_dir, ...), device=, settings= and the settings fields "
                f"{list(_SETTING_FIELDS)}."
            )
        if settings is not None and not isinstance(settings, DiscSettings):
            raise TypeError(f"settings must be a DiscSettings, got {type(settings).__name__}.")
        DiscSettings().replace(**overrides)  # checks the values before any work
        if isinstance(config, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(str(config), trust_remote_code=trust_remote_code)
        device = _normalize_device(device) if device is not None else _default_device()
        model_id = model_id.as_posix() if isinstance(model_id, Path) else str(model_id)
        hub = {
            "subfolder": subfolder,
            "revision": revision,
            "cache_dir": cache_dir,
            "token": token,
            "local_files_only": local_files_only,
            "force_download": force_download,
        }
        if not export:
            directory = _locate_artifact(model_id, **hub)
            if directory is not None:
                return cls._from_artifact(
                    directory, config=config, device=device, settings=settings, overrides=overrides
                )
            logger.warning(
                "%s holds no compiled optimum-disc artifact (%s): compiling the transformers "
                "checkpoint now. Save the result with .save_pretrained(folder) and load that "
                "folder next time, or pass export=True to silence this message.",
                model_id,
                artifact.MANIFEST_NAME,
            )
        return cls._export(
            model_id,
            config=config,
            device=device,
            settings=(settings or DiscSettings()).replace(**overrides),
            trust_remote_code=trust_remote_code,
            **hub,
        )

    @classmethod
    def _settings_overrides(cls, kwargs: dict) -> dict:
        overrides = {name: kwargs.pop(name) for name in _SETTING_FIELDS if name in kwargs}
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else torch_dtype
        if dtype is not None and dtype != "auto":
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, dtype)
            if dtype not in _DTYPE_TO_PRECISION:
                raise ValueError(
                    f"dtype={dtype!r} is not supported; use torch.float32, torch.float16 or "
                    "torch.bfloat16 (or precision='fp32' / 'fp16' / 'bf16')."
                )
            precision = _DTYPE_TO_PRECISION[dtype]
            if overrides.get("precision", precision) != precision:
                raise ValueError(
                    f"dtype={dtype} and precision={overrides['precision']!r} disagree; pass one."
                )
            overrides["precision"] = precision
        return overrides

    @classmethod
    def _export(
        cls,
        model_id: str,
        config: PretrainedConfig | None = None,
        *,
        device: torch.device,
        settings: DiscSettings,
        trust_remote_code: bool = False,
        **hub,
    ):
        """Load the transformers model with ``auto_model_class`` and compile it."""
        from optimum_disc.compiler import optimize

        load_kwargs = _hub_kwargs(hub, trust_remote_code=trust_remote_code)
        if config is not None:
            load_kwargs["config"] = config
        local = Path(model_id, hub.get("subfolder") or "")
        if local.is_dir() and config is None and not (local / "config.json").is_file():
            raise OSError(
                f"{str(local)!r} holds neither a compiled optimum-disc artifact "
                f"({artifact.MANIFEST_NAME}) nor a transformers checkpoint (config.json); pass "
                "the folder of a checkpoint, a Hub id, or a folder written by save_pretrained()."
            )
        weights = ("model*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
        if (
            local.is_dir()
            and artifact.is_artifact(local)
            and not any(any(local.glob(pattern)) for pattern in weights)
        ):
            raise OSError(
                f"{str(local)!r} holds a compiled optimum-disc artifact but no transformers "
                "weights to compile; load it with export=False."
            )
        try:
            hf_model = cls.auto_model_class.from_pretrained(
                model_id, dtype=torch.float32, **load_kwargs
            )
        except OSError as e:
            raise OSError(
                f"found neither a compiled optimum-disc artifact nor a transformers checkpoint "
                f"at {model_id!r}: {e}"
            ) from e
        hf_model = hf_model.eval().to(device)
        compiled = optimize(hf_model, settings)
        config = hf_model.config
        del hf_model
        preprocessors = _load_preprocessors(model_id, hub, trust_remote_code=trust_remote_code)
        return cls(compiled, config, preprocessors)

    @classmethod
    def _from_pretrained(cls, model_id, config=None, **kwargs):
        """Load the artifact in the local folder ``model_id`` (optimum's loading hook)."""
        device = kwargs.get("device")
        device = _normalize_device(device) if device is not None else _default_device()
        return cls._from_artifact(
            Path(model_id, kwargs.get("subfolder") or ""),
            config=config,
            device=device,
            settings=kwargs.get("settings"),
            overrides={k: kwargs[k] for k in _SETTING_FIELDS if k in kwargs},
        )

    @classmethod
    def _from_artifact(cls, directory, *, config, device, settings, overrides):
        loaded = artifact.load_artifact(directory)
        if loaded.task != cls.task:
            right = TASK_TO_CLASS.get(loaded.task)
            raise ValueError(
                f"{str(directory)!r} holds a {loaded.task} model; load it with "
                f"{right.__name__ if right else 'the class for that task'}, not {cls.__name__}."
            )
        runtime = _merge_settings(loaded.settings, settings, overrides, directory)
        if config is None:
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        preprocessors = _load_local_tokenizer(directory, listed=loaded.manifest["files"])
        _log_device_change(loaded.compiled_on, device)
        compiled = _compiled_model(loaded.program, runtime, device, loaded.coverage)
        return cls(compiled, config, preprocessors, artifact_manifest=loaded.manifest)

    # -- saving -----------------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs
    ):
        """Save the artifact into ``save_directory`` (replaced as a whole, atomically).

        Writes ``config.json``, the tokenizer files (when the model has a tokenizer), the
        program, its weights, the settings and a manifest with sha256 hashes. With
        ``push_to_hub=True``, the keyword arguments go to :meth:`push_to_hub`.
        """

        def write(folder: Path) -> None:
            self._save_config(folder)
            for preprocessor in self.preprocessors:
                preprocessor.save_pretrained(folder)
            self._save_pretrained(folder)

        artifact.save_artifact(
            save_directory,
            write,
            task=self.task,
            model_class=type(self).__name__,
            device=self.device,
            coverage=self.coverage,
        )
        if push_to_hub:
            return self.push_to_hub(save_directory, **kwargs)
        return None

    def _save_pretrained(self, save_directory):
        artifact.write_compiled_files(save_directory, self.model.program, self.model.settings)

    def push_to_hub(
        self,
        save_directory: str | os.PathLike,
        repository_id: str,
        private: bool | None = None,
        token: bool | str | None = None,
        **kwargs,
    ) -> str:
        """Upload the artifact saved in ``save_directory``: create the repo, one commit.

        Returns the URL of the commit.
        """
        return artifact.push_to_hub(
            save_directory, repository_id, private=private, token=token, **kwargs
        )

    # -- the transformers-like surface ------------------------------------------------------

    @property
    def compiled(self):
        return self.model

    @property
    def device(self) -> torch.device:
        return _normalize_device(self.model.device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (``precision``); logits come back in float32."""
        return self.model.settings.compute_dtype

    @property
    def settings(self) -> DiscSettings:
        return self.model.settings

    @property
    def program(self):
        return self.model.program

    @property
    def code(self) -> str:
        """The compiled program, readable: one line per kernel call."""
        return self.model.code

    @property
    def coverage(self) -> dict:
        """Which ops run in optimum-disc kernels and their share of the FLOPs."""
        return self.model.coverage

    @property
    def tokenizer(self):
        """The tokenizer the model was loaded with, or None."""
        from transformers import PreTrainedTokenizerBase

        return next((p for p in self.preprocessors if isinstance(p, PreTrainedTokenizerBase)), None)

    @property
    def name_or_path(self) -> str:
        return getattr(self.config, "_name_or_path", "")

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def to(self, *args, **kwargs):
        """Move the model to a device (``"cuda"``, ``"cpu"``, ``torch.device``, GPU index).

        The dtype is fixed when compiling (``precision=``); asking for another one is an error.
        """
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        kwargs.pop("non_blocking", None)
        if kwargs:
            raise TypeError(f"to() got unexpected keyword argument(s) {sorted(kwargs)}.")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, int, torch.device)):
                device = arg
            else:
                raise TypeError(f"to() takes a device or a dtype, got {arg!r}.")
        if dtype is not None and dtype != self.dtype:
            raise ValueError(
                f"this model was compiled with precision={self.settings.precision!r} "
                f"({self.dtype}) and cannot change to {dtype}; export it again with "
                f"precision={_DTYPE_TO_PRECISION.get(dtype, 'fp16')!r}."
            )
        if device is not None:
            device = _normalize_device(device)
            if device != self.device:
                self.model.to(device)
        return self

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if device is not None else "cuda")

    def cpu(self):
        return self.to("cpu")

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("a compiled model runs inference only; train the transformers model.")
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task!r}, model_type="
            f"{getattr(self.config, 'model_type', '?')!r}, precision={self.settings.precision!r}, "
            f"device={str(self.device)!r})"
        )

    # -- calls ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Run the compiled model; returns ``BaseModelOutputWithPoolingAndCrossAttentions``."""
        return self._run(locals())

    _label_names: tuple[str, ...] = ()

    def _run(self, arguments: dict):
        arguments = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
        return_dict = arguments.pop("return_dict", None)
        labels = {name: arguments.pop(name, None) for name in self._label_names}
        unsupported = {
            "position_ids": "it uses positions 0..seq_len-1, as the original does without them",
            "head_mask": "heads cannot be masked",
            "inputs_embeds": "pass input_ids",
        }
        for name, why in unsupported.items():
            if arguments.pop(name, None) is not None:
                raise ValueError(f"{name} is not supported by the compiled model: {why}.")
        for name in ("output_attentions", "output_hidden_states"):
            if arguments.pop(name, None):
                raise ValueError(
                    f"{name}=True is not supported by the compiled model; use the transformers "
                    "model to inspect intermediate values."
                )
        inputs = self._prepare_inputs(**arguments)
        outputs = self.model(**inputs, return_dict=True)
        if any(v is not None for v in labels.values()):
            loss = self._loss(outputs, **{k: self._as_tensor(k, v) for k, v in labels.items()})
            outputs = type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k != "loss"})
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return outputs if return_dict else outputs.to_tuple()

    def _as_tensor(self, name, value):
        if value is None:
            return None
        if isinstance(value, (np.ndarray, list, tuple)):
            value = torch.as_tensor(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor, numpy array or list, got {type(value).__name__}."
            )
        return value.to(self.device)

    def _prepare_inputs(self, input_ids=None, attention_mask=None, token_type_ids=None) -> dict:
        if input_ids is None:
            raise ValueError("input_ids is required: pass the token ids the tokenizer returns.")
        inputs = {
            "input_ids": self._as_tensor("input_ids", input_ids),
            "attention_mask": self._as_tensor("attention_mask", attention_mask),
            "token_type_ids": self._as_tensor("token_type_ids", token_type_ids),
        }
        taken = getattr(self.model.program, "inputs", list(inputs))
        types = inputs["token_type_ids"]
        if "token_type_ids" not in taken and types is not None:
            if bool((types == 0).all()):
                inputs["token_type_ids"] = None  # what the model would do without them
            else:
                raise ValueError(
                    f"this {getattr(self.config, 'model_type', '')} model takes no "
                    "token_type_ids (it has no segment embeddings); call it without them."
                )
        return {k: v for k, v in inputs.items() if v is not None or k == "input_ids"}

    def _loss(self, outputs, **labels):
        raise ValueError(f"{type(self).__name__} computes no loss; it takes no labels.")


class DiscModelForSequenceClassification(DiscModel):
    """Sequence classification (``text-classification``, ``sentiment-analysis``)."""

    auto_model_class = AutoModelForSequenceClassification
    task = "text-classification"
    _transformers_names = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    _label_names = ("labels",)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Run the compiled model; returns ``SequenceClassifierOutput`` (with ``loss`` when
        ``labels`` are given, computed as transformers does)."""
        return self._run(locals())

    def _loss(self, outputs, labels):
        logits = outputs.logits
        num_labels = self.config.num_labels
        problem = self.config.problem_type
        if problem is None:
            if num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            if num_labels == 1:
                return torch.nn.functional.mse_loss(logits.squeeze(), labels.squeeze().float())
            return torch.nn.functional.mse_loss(logits, labels.float())
        if problem == "single_label_classification":
            return torch.nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())


class DiscModelForTokenClassification(DiscModel):
    """Token classification (``token-classification``, ``ner``)."""

    auto_model_class = AutoModelForTokenClassification
    task = "token-classification"
    _transformers_names = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
    _label_names = ("labels",)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Run the compiled model; returns ``TokenClassifierOutput``."""
        return self._run(locals())

    def _loss(self, outputs, labels):
        logits = outputs.logits
        return torch.nn.functional.cross_entropy(
            logits.view(-1, self.config.num_labels), labels.view(-1)
        )


class DiscModelForQuestionAnswering(DiscModel):
    """Extractive question answering (``question-answering``)."""

    auto_model_class = AutoModelForQuestionAnswering
    task = "question-answering"
    _transformers_names = "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"
    _label_names = ("start_positions", "end_positions")

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Run the compiled model; returns ``QuestionAnsweringModelOutput``."""
        return self._run(locals())

    def _loss(self, outputs, start_positions, end_positions):
        if start_positions is None or end_positions is None:
            raise ValueError("pass both start_positions and end_positions to compute the loss.")
        ignored = outputs.start_logits.size(1)
        start_positions = start_positions.view(-1).clamp(0, ignored)
        end_positions = end_positions.view(-1).clamp(0, ignored)
        ce = torch.nn.CrossEntropyLoss(ignore_index=ignored)
        return (
            ce(outputs.start_logits, start_positions) + ce(outputs.end_logits, end_positions)
        ) / 2


class DiscModelForMaskedLM(DiscModel):
    """Masked language modelling (``fill-mask``)."""

    auto_model_class = AutoModelForMaskedLM
    task = "fill-mask"
    _transformers_names = "MODEL_FOR_MASKED_LM_MAPPING_NAMES"
    _label_names = ("labels",)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        head_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        """Run the compiled model; returns ``MaskedLMOutput``."""
        return self._run(locals())

    def _loss(self, outputs, labels):
        logits = outputs.logits
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


TASK_TO_CLASS: dict[str, type[DiscModel]] = {
    cls.task: cls
    for cls in (
        DiscModel,
        DiscModelForSequenceClassification,
        DiscModelForTokenClassification,
        DiscModelForQuestionAnswering,
        DiscModelForMaskedLM,
    )
}
TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
_ARCHITECTURE_SUFFIXES = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
}


def normalize_task(task: str) -> str:
    """The task name optimum-disc uses for ``task`` (aliases resolved); errors if unknown."""
    name = TASK_ALIASES.get(task, task)
    if name not in TASK_TO_CLASS:
        raise ValueError(
            f"task={task!r} is not supported; optimum-disc compiles "
            f"{sorted(TASK_TO_CLASS)} (and the aliases {sorted(TASK_ALIASES)})."
        )
    return name


def infer_task(config: PretrainedConfig) -> str:
    """The task of a checkpoint, from its ``architectures`` (feature-extraction if none)."""
    for architecture in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCHITECTURE_SUFFIXES.items():
            if architecture.endswith(suffix):
                return task
    return "feature-extraction"


# -- helpers ------------------------------------------------------------------------------


def _hub_kwargs(hub: dict, **extra) -> dict:
    kwargs = {k: v for k, v in hub.items() if v not in (None, "", False)}
    kwargs.update({k: v for k, v in extra.items() if v})
    return kwargs


def _locate_artifact(model_id: str, **hub) -> Path | None:
    """The folder of the artifact at ``model_id`` (local or resolved from the Hub), or None."""
    subfolder = hub.get("subfolder") or ""
    local = Path(model_id, subfolder)
    if local.is_dir():
        return local if artifact.is_artifact(local) else None
    if Path(model_id).is_dir():
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
    )

    kwargs = {
        "repo_id": model_id,
        "subfolder": subfolder or None,
        "revision": hub.get("revision"),
        "cache_dir": hub.get("cache_dir"),
        "token": hub.get("token"),
        "local_files_only": bool(hub.get("local_files_only")),
        "force_download": bool(hub.get("force_download")),
    }
    try:
        manifest_path = hf_hub_download(filename=artifact.MANIFEST_NAME, **kwargs)
    except HFValidationError as e:
        raise ValueError(
            f"{model_id!r} is neither a local folder nor a Hub repository id ({e}); pass the path "
            "of a saved model or checkpoint, or a repository id like 'org/name'."
        ) from None
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    directory = Path(manifest_path).parent
    manifest = artifact.read_manifest(directory)
    for name in manifest["files"]:
        hf_hub_download(filename=name, **kwargs)
    return directory


def _load_preprocessors(model_id: str, hub: dict, trust_remote_code: bool = False) -> list:
    """The tokenizer of a checkpoint, if it has one."""
    local = Path(model_id, hub.get("subfolder") or "")
    if local.is_dir() and not any((local / name).is_file() for name in _TOKENIZER_FILES):
        return []
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_id, **_hub_kwargs(hub, trust_remote_code=trust_remote_code)
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        logger.info("no tokenizer loaded with %s: %s", model_id, e)
        return []
    return [tokenizer]


def _load_local_tokenizer(directory: Path, listed=None) -> list:
    """The tokenizer saved in ``directory``. With ``listed`` (the manifest's verified files), it
    is read from those files only: a file dropped into the folder later (a
    special_tokens_map.json, an added_tokens.json) cannot change it."""
    if not any((Path(directory) / name).is_file() for name in _TOKENIZER_FILES):
        return []
    if listed is None:
        return [AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)]
    import shutil
    import tempfile

    skip = {*artifact.COMPILED_FILES, artifact.MANIFEST_NAME}
    with tempfile.TemporaryDirectory(prefix="disc-tokenizer-") as only_listed:
        for name in listed:
            if name not in skip:
                (Path(only_listed) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(directory) / name, Path(only_listed) / name)
        if not any((Path(only_listed) / name).is_file() for name in _TOKENIZER_FILES):
            return []
        tokenizer = AutoTokenizer.from_pretrained(only_listed, trust_remote_code=False)
    tokenizer.name_or_path = str(directory)
    return [tokenizer]


def _merge_settings(saved: DiscSettings, settings, overrides: dict, directory) -> DiscSettings:
    requested = dict(overrides)
    if settings is not None:
        requested = {**dataclasses.asdict(settings), **requested}
    for name in _COMPILE_TIME_SETTINGS:
        if name in requested and requested[name] != getattr(saved, name):
            raise ValueError(
                f"the artifact in {str(directory)!r} was compiled with {name}="
                f"{getattr(saved, name)!r}; {name}={requested[name]!r} needs a new export: "
                f"from_pretrained(<transformers checkpoint>, export=True, {name}="
                f"{requested[name]!r})."
            )
    return saved.replace(**{k: v for k, v in requested.items() if k not in _COMPILE_TIME_SETTINGS})


def _compiled_model(program, settings, device, coverage):
    from optimum_disc.compiler import CompiledModel

    if "coverage" in inspect.signature(CompiledModel).parameters:
        return CompiledModel(program, settings, device=device, coverage=coverage)
    return CompiledModel(program, settings, device=device)


def _log_device_change(compiled_on: dict, device: torch.device) -> None:
    if not compiled_on:
        return
    here = artifact.device_info(device)
    before = compiled_on.get("compute_capability")
    if before == here["compute_capability"]:
        return
    gpu_to_gpu = here["type"] == "cuda" and compiled_on.get("type") == "cuda"
    logger.log(
        logging.WARNING if gpu_to_gpu else logging.INFO,
        "this artifact was compiled on %s (compute capability %s) and now runs on %s (%s); its "
        "tuned kernel choices are handed to the runtime as they are.",
        compiled_on.get("name"),
        before,
        here["name"],
        here["compute_capability"],
    )


def _register_with_transformers() -> None:
    """Let transformers' pipelines accept the Disc classes without logging an error.

    Pipelines check ``type(model).__name__`` against the model-class names of their task
    (``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``...). optimum-onnx registers its classes
    with the AutoModel classes for the same purpose; transformers 5 checks the name dicts, so
    each Disc head adds its class name there under the key ``"optimum-disc"``, which is no
    model type and so never changes what the Auto classes load.
    """
    from transformers.models.auto import modeling_auto

    for cls in TASK_TO_CLASS.values():
        names = getattr(modeling_auto, cls._transformers_names or "", None)
        if isinstance(names, dict):
            names.setdefault("optimum-disc", cls.__name__)


_register_with_transformers()


# -- pipelines ----------------------------------------------------------------------------


class QuestionAnsweringPipeline(Pipeline):
    """Extractive question answering (transformers 5 has no ``question-answering`` pipeline).

    Works with any model that returns ``start_logits`` and ``end_logits`` (a
    ``DiscModelForQuestionAnswering`` or a transformers ``...ForQuestionAnswering``) and a fast
    tokenizer. Long contexts are split into overlapping windows (``max_seq_len``,
    ``doc_stride``); the answer is the span with the highest ``p(start) * p(end)`` over the
    context tokens, at most ``max_answer_len`` tokens long.

    Call it with ``question=`` and ``context=`` (strings or lists of strings), or with a dict
    ``{"question": ..., "context": ...}`` or a list of them. Returns
    ``{"score", "start", "end", "answer"}`` (a list of them with ``top_k > 1``).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(
        self, top_k=None, max_answer_len=None, max_seq_len=None, doc_stride=None, **kwargs
    ):
        if kwargs:
            raise TypeError(f"the question-answering pipeline got unexpected {sorted(kwargs)}.")
        preprocess, postprocess = {}, {}
        if max_seq_len is not None:
            preprocess["max_seq_len"] = int(max_seq_len)
        if doc_stride is not None:
            preprocess["doc_stride"] = int(doc_stride)
        if top_k is not None:
            if int(top_k) < 1:
                raise ValueError(f"top_k={top_k} must be at least 1.")
            postprocess["top_k"] = int(top_k)
        if max_answer_len is not None:
            if int(max_answer_len) < 1:
                raise ValueError(f"max_answer_len={max_answer_len} must be at least 1.")
            postprocess["max_answer_len"] = int(max_answer_len)
        return preprocess, {}, postprocess

    def __call__(self, *args, question=None, context=None, **kwargs):
        kwargs.pop("batch_size", None)
        kwargs.pop("num_workers", None)
        examples, single = self._examples(args, question, context)
        pre, fwd, post = self._sanitize_parameters(**kwargs)
        pre = {**self._preprocess_params, **pre}
        fwd = {**self._forward_params, **fwd}
        post = {**self._postprocess_params, **post}
        results = [self.run_single(example, pre, fwd, post) for example in examples]
        return results[0] if single else results

    @staticmethod
    def _examples(args, question, context):
        if question is not None or context is not None:
            if question is None or context is None or args:
                raise ValueError("pass both question= and context=, and no positional input.")
            if isinstance(question, str) and isinstance(context, str):
                return [{"question": question, "context": context}], True
            questions = [question] if isinstance(question, str) else list(question)
            contexts = [context] if isinstance(context, str) else list(context)
            if len(questions) == 1 and len(contexts) > 1:
                questions = questions * len(contexts)
            if len(contexts) == 1 and len(questions) > 1:
                contexts = contexts * len(questions)
            if len(questions) != len(contexts):
                raise ValueError(
                    f"{len(questions)} questions and {len(contexts)} contexts; pass as many "
                    "of each."
                )
            return [{"question": q, "context": c} for q, c in zip(questions, contexts)], False
        if len(args) != 1:
            raise ValueError("pass question= and context=, or one dict or list of dicts.")
        inputs, single = args[0], isinstance(args[0], dict)
        examples = [inputs] if single else list(inputs)
        for example in examples:
            if not isinstance(example, dict) or not {"question", "context"} <= set(example):
                raise ValueError(
                    f"each input must be a dict with 'question' and 'context', got {example!r}."
                )
        return examples, single

    def preprocess(self, example, max_seq_len=None, doc_stride=None):
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("the question-answering pipeline needs a fast tokenizer (offsets).")
        limit = min(
            int(getattr(self.tokenizer, "model_max_length", 384) or 384),
            int(getattr(self.model.config, "max_position_embeddings", 512)),
        )
        max_seq_len = min(max_seq_len or 384, limit)
        doc_stride = min(doc_stride if doc_stride is not None else 128, max_seq_len // 2)
        # The windows are cut here, not by the tokenizer's truncation with
        # return_overflowing_tokens: tokenizers 0.23.1 and 0.23.2 stop tokenizing a truncated
        # input at max_length, so their overflowing windows end before a long context does
        # (huggingface/tokenizers#2091). The pair is tokenized whole, once; each window keeps
        # the tokens around the context (special tokens, question) and a slice of the context's
        # tokens, as truncating the second sequence would.
        encoded = self.tokenizer(
            example["question"],
            example["context"],
            truncation=False,
            padding=False,
            return_offsets_mapping=True,
            verbose=False,  # a context longer than the model's limit is what windows are for
        )
        sequence_ids = encoded.sequence_ids()
        total = len(sequence_ids)
        in_context = [i for i, sid in enumerate(sequence_ids) if sid == 1]
        first, last = (in_context[0], in_context[-1] + 1) if in_context else (total, total)
        if in_context != list(range(first, last)):
            raise ValueError("the tokenizer does not keep the context's tokens together.")
        room = max_seq_len - (total - (last - first))  # context tokens that fit in a window
        if room < 1:
            raise ValueError(
                f"the question takes {total - (last - first)} tokens with the special tokens, "
                f"max_seq_len={max_seq_len} leaves none for the context; pass a larger "
                "max_seq_len or a shorter question."
            )
        step = max(room - doc_stride, 1)  # consecutive windows share doc_stride tokens
        spans, begin = [], first
        while True:
            spans.append((begin, min(begin + room, last)))
            if begin + room >= last:
                break
            begin += step

        def window(values, a, b):
            return list(values[:first]) + list(values[a:b]) + list(values[last:])

        pads = {
            "input_ids": self.tokenizer.pad_token_id or 0,  # padding is masked out
            "attention_mask": 0,
            "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0),
            "offset_mapping": (0, 0),
            "context_mask": False,
        }
        rows = {
            key: [window(encoded[key], a, b) for a, b in spans]
            for key in ("input_ids", "attention_mask", "token_type_ids", "offset_mapping")
            if key in encoded
        }
        rows["context_mask"] = [window([sid == 1 for sid in sequence_ids], a, b) for a, b in spans]
        width = max(len(row) for row in rows["input_ids"])
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        for key, values in rows.items():
            for i, row in enumerate(values):
                fill = [pads[key]] * (width - len(row))
                values[i] = fill + row if left else row + fill
        model_inputs = {
            k: torch.tensor(rows[k])
            for k in ("input_ids", "attention_mask", "token_type_ids")
            if k in rows
        }
        return {
            "model_inputs": model_inputs,
            "offsets": torch.tensor(rows["offset_mapping"]),
            "context_mask": torch.tensor(rows["context_mask"]),
            "context": example["context"],
        }

    def _forward(self, inputs):
        outputs = self.model(**inputs["model_inputs"])
        return {
            "start_logits": outputs["start_logits"],
            "end_logits": outputs["end_logits"],
            "offsets": inputs["offsets"],
            "context_mask": inputs["context_mask"],
            "context": inputs["context"],
        }

    def postprocess(self, outputs, top_k=1, max_answer_len=15):
        candidates = []
        for w in range(outputs["start_logits"].shape[0]):
            mask = outputs["context_mask"][w]
            if not bool(mask.any()):
                continue
            start = outputs["start_logits"][w].float().masked_fill(~mask, -1e4).softmax(-1)
            end = outputs["end_logits"][w].float().masked_fill(~mask, -1e4).softmax(-1)
            scores = torch.outer(start, end)
            scores = torch.triu(scores) - torch.triu(scores, diagonal=max_answer_len)
            scores = scores.masked_fill(~(mask[:, None] & mask[None, :]), 0.0)
            best = scores.flatten().topk(min(top_k, scores.numel()))
            for score, flat in zip(best.values.tolist(), best.indices.tolist()):
                i, j = divmod(flat, scores.shape[1])
                candidates.append((score, w, i, j))
        candidates.sort(key=lambda c: -c[0])
        answers = []
        for score, w, i, j in candidates[:top_k]:
            begin = int(outputs["offsets"][w][i][0])
            finish = int(outputs["offsets"][w][j][1])
            answers.append(
                {
                    "score": score,
                    "start": begin,
                    "end": finish,
                    "answer": outputs["context"][begin:finish],
                }
            )
        return answers[0] if top_k == 1 and answers else answers


def pipeline(
    task: str,
    model: str | os.PathLike | DiscModel,
    tokenizer=None,
    device: str | torch.device | int | None = None,
    model_kwargs: dict | None = None,
    **kwargs,
):
    """A transformers pipeline over a compiled model.

    Args:
        task: ``"text-classification"`` (or ``"sentiment-analysis"``), ``"feature-extraction"``,
            ``"token-classification"`` (or ``"ner"``), ``"question-answering"``, ``"fill-mask"``.
        model: a Disc model, or a folder / Hub id loaded with the Disc class of the task.
        tokenizer: a tokenizer or a name to load one; by default the model's own (saved with
            the artifact, or found with the checkpoint it was exported from).
        device: where to run; by default where the model is.
        model_kwargs: passed to ``from_pretrained`` when ``model`` is a path or id.
        kwargs: passed to the pipeline (``batch_size``, ``top_k``, ``truncation``...).

    Example:
        >>> import pathlib, tempfile, transformers
        >>> from optimum_disc.modeling import DiscModelForSequenceClassification, pipeline
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
        >>> transformers.BertForSequenceClassification(config).save_pretrained(folder)
        >>> words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
        >>> _ = (folder / "vocab.txt").write_text("\\n".join(words))
        >>> _ = transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
        >>> model = DiscModelForSequenceClassification.from_pretrained(folder, export=True,
        ...     device="cpu")
        >>> classify = pipeline("sentiment-analysis", model=model)  # the model's own tokenizer
        >>> [sorted(result) for result in classify(["good movie", "bad movie"])]
        [['label', 'score'], ['label', 'score']]
    """
    import transformers

    name = normalize_task(task)
    cls = TASK_TO_CLASS[name]
    if isinstance(model, (str, os.PathLike)):
        model_kwargs = dict(model_kwargs or {})
        if device is not None:
            model_kwargs.setdefault("device", device)
        model = cls.from_pretrained(model, **model_kwargs)
    elif not isinstance(model, DiscModel):
        raise TypeError(
            f"model must be a Disc model or the path / Hub id of one, got {type(model).__name__}; "
            "for a transformers model use transformers.pipeline."
        )
    if model.task != name:
        raise ValueError(
            f"task={task!r} needs a {cls.__name__}, but the model is a {type(model).__name__} "
            f"({model.task})."
        )
    if tokenizer is None:
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError(
                "the model has no tokenizer (none was saved with it); pass tokenizer=, e.g. "
                "AutoTokenizer.from_pretrained(<the original checkpoint>)."
            )
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    device = model.device if device is None else _normalize_device(device)
    if name == "question-answering":
        return QuestionAnsweringPipeline(
            model=model, tokenizer=tokenizer, task=name, device=device, **kwargs
        )
    return transformers.pipeline(name, model=model, tokenizer=tokenizer, device=device, **kwargs)


__all__ = [
    "DiscModel",
    "DiscModelForSequenceClassification",
    "DiscModelForTokenClassification",
    "DiscModelForQuestionAnswering",
    "DiscModelForMaskedLM",
    "QuestionAnsweringPipeline",
    "TASK_TO_CLASS",
    "infer_task",
    "normalize_task",
    "pipeline",
]
