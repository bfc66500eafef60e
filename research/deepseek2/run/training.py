"""train / finetune through MindFormers' Trainer (CausalLanguageModelingTrainer).

The network is built here, from the YAML through MindFormers' registry as the Trainer would build it, and laid out
(``planning.layout``: pipeline stages and recompute; under semi-auto/auto parallel, Ascend training beyond data
parallel, the capacity dispatch's data-parallel token groups and the op strategies) before the Trainer compiles it.
A checkpoint is opened and checked once, before anything starts; standalone and data-parallel runs load it here
(``checkpoints.load_checkpoint``), semi-auto runs and resumed runs through MindFormers' loader. The model class
itself reads no checkpoint and no parallel context.
"""
import json
import os

import numpy as np

from mindformers.tools.logger import logger

from research.deepseek2.checkpoints import open_checkpoint
from research.deepseek2.errors import CheckpointError, PetConfigError, UsageError

__all__ = ["run_training", "is_semi_auto", "build_network", "build_semi_auto_network", "build_loaded_network",
           "check_run_checkpoint", "model_config_of", "resume_file", "stage_safetensors_resume", "add_stop_step"]

_SEMI_AUTO_MODES = (1, 2, "semi_auto_parallel", "auto_parallel")


def is_semi_auto(config) -> bool:
    """True when the YAML asks for semi-auto/auto parallel (``use_parallel`` with ``parallel.parallel_mode`` 1 or 2)."""
    return bool(config.get("use_parallel")) and (config.get("parallel") or {}).get("parallel_mode", 0) in \
        _SEMI_AUTO_MODES


def model_config_of(config):
    """DeepseekV2Config from the YAML's model.model_config (UsageError naming the field it refuses)."""
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    fields = {k: v for k, v in dict(config.model.model_config).items() if k not in ("type", "pet_config")}
    try:
        return DeepseekV2Config(**fields)
    except (ValueError, TypeError) as err:
        raise UsageError(f"model.model_config: {err}") from err


def pet_config_of(config):
    """The YAML's model.model_config.pet_config, checked (``lora.parse_pet_config``), or None for a full finetune."""
    pet_config = config.model.model_config.get("pet_config")
    if not pet_config:
        return None
    if config.model.model_config.get("quantization_config"):
        raise UsageError("model.model_config has both pet_config and quantization_config: LoRA adapters merge into "
                         "float weights; merge them first (convert_weight.py --reverse with the LoRA YAML), then "
                         "quantize the merged folder (convert_weight.py --quantize)")
    from research.deepseek2.lora.config import expected_adapter_shapes
    try:
        expected_adapter_shapes(model_config_of(config), pet_config)   # fields, and target_modules matches
    except PetConfigError as err:
        raise UsageError(f"model.model_config.{err}") from err
    return pet_config


def _checkpoint_suffix(folder: str) -> str:
    """'safetensors' or 'ckpt': the kind of checkpoint files a training output folder holds."""
    found = [suffix for suffix in ("safetensors", "ckpt") if any(n.endswith("." + suffix) for n in os.listdir(folder))]
    if len(found) > 1:
        raise UsageError(f"--load_checkpoint {folder}: holds both .safetensors and .ckpt files; give the file to "
                         f"resume from")
    if not found:
        raise UsageError(f"--load_checkpoint {folder}: no .safetensors or .ckpt checkpoint to resume from")
    return found[0]


def resume_file(path: str, rank: int, name=None) -> str:
    """The checkpoint file a resumed run of rank ``rank`` continues from: ``path`` itself when it is a file; in a
    MindFormers output folder (``rank_N/``), the one ``name`` (``resume_training: NAME``), else the one its
    ``meta.json`` records, else the newest checkpoint file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"--load_checkpoint {path}: no such file or folder")
    folder = os.path.join(path, f"rank_{rank}")
    folder = folder if os.path.isdir(folder) else path
    fmt = _checkpoint_suffix(folder)
    if isinstance(name, str):
        file = os.path.join(folder, name if name.endswith("." + fmt) else f"{name}.{fmt}")
        if not os.path.isfile(file):
            raise UsageError(f"--resume_training {name}: {file} not found")
        return file
    meta = os.path.join(folder, "meta.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as handle:
            last = json.load(handle).get("last_ckpt_file")
        if last and os.path.isfile(os.path.join(folder, last)):
            return os.path.join(folder, last)
    files = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith("." + fmt)]
    return max(files, key=os.path.getmtime)


def _rank() -> int:
    return int(os.environ.get("RANK_ID") or os.environ.get("RANK") or 0)


def check_run_checkpoint(config):
    """Before the run starts: open the checkpoint once and check that it gives every weight of the model its shape
    (and, resuming, every AdamW moment), in the format ``load_ckpt_format`` names. Sets ``load_ckpt_format`` to what
    the checkpoint holds when the YAML and flags leave it unset. UsageError naming the checkpoint and the tensors
    otherwise. Returns (the opened checkpoint or None, whether it holds the LoRA adapters of the YAML's pet_config:
    a LoRA training output)."""
    from research.deepseek2.checkpoints.check import check_checkpoint
    path = config.get("load_checkpoint")
    declared = config.get("load_ckpt_format") or None
    if not path:
        config.load_ckpt_format = declared or "ckpt"
        return None, False
    resume = config.get("resume_training")
    model_config = model_config_of(config)
    pet_config = pet_config_of(config)
    adapters = None
    if pet_config:
        from research.deepseek2.lora.config import expected_adapter_shapes
        adapters = expected_adapter_shapes(model_config, pet_config)
    try:
        checkpoint = open_checkpoint(resume_file(path, _rank(), resume) if resume else path)
        has_adapters = check_checkpoint(model_config, checkpoint, resume=bool(resume), declared_format=declared,
                                        adapters=adapters)
    except CheckpointError as err:
        raise UsageError(f"--load_checkpoint {path}: {err}") from err
    if is_semi_auto(config) and checkpoint.kind == "hf":
        raise UsageError(f"--load_checkpoint {path}: semi-auto parallel loads through MindFormers' distributed "
                         f"loader, which cannot stack a Hugging Face folder's routed experts; convert it first "
                         f"(convert_weight.py --torch_ckpt_path {path} --mindspore_ckpt_path OUT_DIR/) and load "
                         f"OUT_DIR with auto_trans_ckpt True")
    fmt = checkpoint.format
    if fmt == "bin" and declared == "ckpt":
        raise UsageError(f"load_ckpt_format is 'ckpt' but {path} is a Hugging Face folder of .bin files "
                         f"(set load_ckpt_format: safetensors, or leave it unset)")
    config.load_ckpt_format = declared or ("safetensors" if fmt == "bin" else fmt)
    logger.info(f"checkpoint {path} ({fmt}) holds every weight of the model"
                + (" and the LoRA adapters" if has_adapters else "")
                + (" and its optimizer state" if resume else ""))
    return checkpoint, has_adapters


def build_network(config, local=None):
    """The network as MindFormers' Trainer builds it from the YAML (registry, same default arguments), with
    ``local`` (what this process holds) given to the constructor, then placed on pipeline stages with recompute as
    the YAML's parallel_config and recompute_config say (``layout.place_layers``)."""
    from mindformers.core.parallel_config import build_parallel_config
    from mindformers.models import build_network as mf_build_network
    from research.deepseek2.planning.layout import place_layers
    build_parallel_config(config)                    # parallel/recompute/moe sections as MindFormers' objects
    if local is not None:
        config.model.arch.local = local
    # LoRA is put on by this project (lora.apply_lora); MindFormers' get_pet_model, which build_network calls for a
    # pet_config, swaps only its own Linear classes and would then freeze every weight of this model
    pet_config = config.model.model_config.get("pet_config")
    config.model.model_config.pet_config = None
    try:
        network = mf_build_network(config.model, default_args={
            "parallel_config": config.parallel_config, "moe_config": config.moe_config,
            "dataset_config": config.train_dataset,
            "calculate_per_token_loss": getattr(config, "calculate_per_token_loss", False)})
        place_layers(network, config.parallel_config, config.model.model_config.get("offset"))
        return network
    finally:
        config.model.model_config.pet_config = pet_config
        if local is not None:
            del config.model.arch["local"]


def build_semi_auto_network(config):
    """The network of a semi-auto/auto parallel run: built with ``training_local_shape``, then laid out."""
    from mindformers.core.parallel_config import build_parallel_config
    from research.deepseek2.planning.layout import apply_semi_auto, training_local_shape
    from research.deepseek2.planning.parallel_check import parallel_shape
    build_parallel_config(config)
    sizes = parallel_shape(config.parallel_config)
    network = build_network(config, training_local_shape(sizes, semi_auto=True))
    applied = apply_semi_auto(network, sizes)
    logger.info(f"semi-auto layout: {len(applied)} op strategies set for dp {sizes.dp}, mp {sizes.mp}, ep {sizes.ep}")
    return network


def build_loaded_network(config, checkpoint, has_adapters: bool = False):
    """Standalone and data-parallel runs starting from a checkpoint (opened by ``check_run_checkpoint``): the network
    built here and every weight loaded by ``checkpoints.load_checkpoint`` (streamed shard by shard; a Hugging Face
    folder's experts stacked on the way); the Trainer is then given the network and no checkpoint. Each
    data-parallel rank loads it all."""
    from research.deepseek2.checkpoints.load import build_empty, load_checkpoint
    network = build_empty(build_network, config)     # no random fill: the checkpoint gives every weight
    path = config.load_checkpoint
    pet_config = pet_config_of(config)
    with_adapters = bool(pet_config) and has_adapters
    if with_adapters:                                # a LoRA output: base and adapters both come from it
        apply_lora_logged(network, pet_config)
    try:
        loaded = load_checkpoint(network, checkpoint)
    except CheckpointError as err:
        raise UsageError(f"--load_checkpoint {path}: {err}") from err
    network.init_parameters_data()
    if pet_config and not with_adapters:            # a base model: fresh adapters (B = 0) on the loaded weights
        apply_lora_logged(network, pet_config)
    logger.info(f"loaded {len(loaded)} weights from {path}: every weight of the network")
    config.load_checkpoint = ""
    return network


def apply_lora_logged(network, pet_config):
    """lora.apply_lora with what it did logged (UsageError naming the pet_config field it refuses)."""
    from research.deepseek2.lora.cells import apply_lora
    try:
        names = apply_lora(network, pet_config)
    except PetConfigError as err:
        raise UsageError(f"model.model_config.{err}") from err
    trainable = sum(int(np.prod(p.shape)) for p in network.trainable_params())
    total = sum(int(np.prod(p.shape)) for p in network.get_parameters())
    logger.info(f"LoRA: {len(names)} adapter tensors, {trainable:,} trainable of {total:,} parameters "
                f"({100.0 * trainable / max(total, 1):.3f}%); every base weight frozen")
    return names


def stage_safetensors_resume(config):
    """A single-process run resuming from a MindSpore safetensors checkpoint.

    MindFormers 1.9 refuses both ways in: its output folder (``rank_0/``) needs use_parallel, and a file path
    fails its Hugging Face folder check. Its ``.ckpt`` resume works, so the chosen file is rewritten as one
    ``.ckpt`` (same tensors, bits and step counters, in file order: what ``mindspore.save_checkpoint`` would write)
    under output_dir/resume_staging/rank_0 and resumed from there. The project's writer stages it (fileio) and reads
    one tensor at a time.
    """
    from research.deepseek2.checkpoints.ckpt_file import CkptWriter
    path = config.load_checkpoint
    source = resume_file(path, _rank(), config.resume_training)
    folder = os.path.join(config.output_dir or "./output", "resume_staging", "rank_0")
    target = os.path.join(folder, os.path.basename(source)[:-len(".safetensors")] + ".ckpt")
    with CkptWriter(target) as writer:                    # renamed into place when complete, removed on error
        for _, name, array in open_checkpoint(source).iter_parameters(progress=False):
            writer.write(name, array)
    logger.info(f"resuming from {source} (rewritten as {target} for MindFormers' .ckpt resume)")
    config.load_checkpoint = os.path.dirname(folder)
    config.load_ckpt_format = "ckpt"
    if isinstance(config.resume_training, str):
        config.resume_training = True


def add_stop_step(config):
    """``runner_config.stop_step: N`` (MindFormers' key: train N steps, then stop) as the callback MindFormers 1.9
    builds for it and then leaves out of the run (``base_trainer.py`` makes the ``TrainCallBack`` entry and never adds
    it), so a few steps can be run instead of whole epochs. UsageError for a value that is not a positive integer."""
    stop_step = (config.get("runner_config") or {}).get("stop_step")
    if stop_step in (None, 0):
        return
    if isinstance(stop_step, bool) or not isinstance(stop_step, int) or stop_step < 0:
        raise UsageError(f"runner_config.stop_step = {stop_step!r}: expected a positive number of steps (0: off)")
    callbacks = list(config.get("callbacks") or [])
    if not any(callback.get("type") == "TrainCallBack" for callback in callbacks):
        callbacks.append({"type": "TrainCallBack", "stop_step": stop_step})
        config.callbacks = callbacks
    logger.info(f"runner_config.stop_step {stop_step}: training stops after step {stop_step}")


def run_training(config):
    """Check the checkpoint, build the context from the YAML and train; finetune starts from load_checkpoint."""
    import mindspore as ms
    from mindformers import Trainer
    from mindformers.core.context import build_context
    from research.deepseek2.run.cpu_barrier import install_cpu_barrier

    if config.get("output_dir"):
        config.output_dir = os.path.abspath(config.output_dir)
    pet_config_of(config)                              # a bad pet_config field: refused before anything starts
    if config.model.model_config.get("quantization_config"):
        raise UsageError(f"--run_mode {config.run_mode} with model.model_config.quantization_config: quantized "
                         f"weights are for predict and evaluation (they do not train); finetune the float "
                         f"checkpoint and quantize the result (convert_weight.py --quantize)")
    checkpoint, has_adapters = check_run_checkpoint(config)   # nothing started, nothing written if it is refused
    build_context(config)
    install_cpu_barrier()   # CPU + msrun: MindFormers' checkpoint-loading barrier() as an AllReduce
    if config.get("seed") is not None:
        ms.set_seed(int(config.seed))
    resume = bool(config.get("resume_training"))
    pet_config = pet_config_of(config)
    if is_semi_auto(config):
        network = build_semi_auto_network(config)      # MindFormers loads (and slices) the checkpoint
        if pet_config:                                 # adapters' matmuls take MindSpore's default strategy
            apply_lora_logged(network, pet_config)
    elif checkpoint is not None and not resume:
        network = build_loaded_network(config, checkpoint, has_adapters)
    else:
        # from random weights, or resumed by the Trainer from load_checkpoint
        network = build_network(config)
        if pet_config:
            apply_lora_logged(network, pet_config)
        if resume and config.load_ckpt_format == "safetensors" and not config.get("use_parallel"):
            stage_safetensors_resume(config)
    if pet_config:
        config.model.model_config.pet_config = None    # applied: MindFormers must not apply its own on top
    add_stop_step(config)
    trainer = Trainer(args=config, task="text_generation", model=network)
    logger.info(f"{config.run_mode}: model {config.model.arch.type}, data "
                f"{config.train_dataset.data_loader.dataset_dir}, output {config.output_dir}")
    checkpoint = config.load_checkpoint or False
    if config.run_mode == "finetune":
        trainer.finetune(finetune_checkpoint=checkpoint, resume_training=resume)
    else:
        trainer.train(train_checkpoint=checkpoint, resume_training=resume)
    return trainer
