"""train / finetune through MindFormers' Trainer (CausalLanguageModelingTrainer).

The Trainer builds the network from the YAML (MindFormers' registry) and loads ``load_checkpoint`` into it, except
under semi-auto/auto parallel (Ascend training beyond data parallel): there the network is built here with the
data-parallel token groups of the capacity dispatch and laid out (``parallel.apply_semi_auto``) before the Trainer
compiles it. The model class itself reads no checkpoint and no parallel context.
"""
import json
import os

import numpy as np

from mindformers.tools.logger import logger

from .errors import CheckpointError, UsageError

__all__ = ["run_training", "is_semi_auto", "build_network", "build_semi_auto_network", "build_loaded_network",
           "check_run_checkpoint", "model_config_of", "resume_file", "stage_safetensors_resume"]

_SEMI_AUTO_MODES = (1, 2, "semi_auto_parallel", "auto_parallel")


def is_semi_auto(config) -> bool:
    """True when the YAML asks for semi-auto/auto parallel (``use_parallel`` with ``parallel.parallel_mode`` 1 or 2)."""
    return bool(config.get("use_parallel")) and (config.get("parallel") or {}).get("parallel_mode", 0) in \
        _SEMI_AUTO_MODES


def model_config_of(config):
    """DeepseekV2Config from the YAML's model.model_config (UsageError naming the field it refuses)."""
    from .deepseek2_config import DeepseekV2Config
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
    from .lora import PetConfigError, expected_adapter_shapes
    try:
        expected_adapter_shapes(model_config_of(config), pet_config)   # fields, and target_modules matches
    except PetConfigError as err:
        raise UsageError(f"model.model_config.{err}") from err
    return pet_config


def resume_file(path: str, rank: int, fmt: str, name=None) -> str:
    """The checkpoint file a resumed run of rank ``rank`` continues from: ``path`` itself when it is a file; in a
    MindFormers output folder (``rank_N/``), the one ``name`` (``resume_training: NAME``), else the one its
    ``meta.json`` records, else the newest ``.{fmt}`` file."""
    if os.path.isfile(path):
        return path
    folder = os.path.join(path, f"rank_{rank}")
    folder = folder if os.path.isdir(folder) else path
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
    if not files:
        raise UsageError(f"--load_checkpoint {path}: no .{fmt} checkpoint to resume from in {folder}")
    return max(files, key=os.path.getmtime)


def _rank() -> int:
    return int(os.environ.get("RANK_ID") or os.environ.get("RANK") or 0)


def check_run_checkpoint(config):
    """Before the run starts: the checkpoint gives every weight of the model its shape (and, resuming, every AdamW
    moment), in the format ``load_ckpt_format`` names. Sets ``load_ckpt_format`` to what the path holds when the
    YAML and flags leave it unset. UsageError naming the checkpoint and the tensors otherwise. Returns whether the
    checkpoint holds the LoRA adapters of the YAML's pet_config (a LoRA training output)."""
    from .ckpt_check import check_checkpoint, stored_format
    from .ckpt_folders import is_hf_folder
    path = config.get("load_checkpoint")
    declared = config.get("load_ckpt_format") or None
    if not path:
        config.load_ckpt_format = declared or "ckpt"
        return False
    resume = config.get("resume_training")
    model_config = model_config_of(config)
    pet_config = pet_config_of(config)
    adapters = None
    if pet_config:
        from .lora import expected_adapter_shapes
        adapters = expected_adapter_shapes(model_config, pet_config)
    try:
        fmt = stored_format(path)
        target = resume_file(path, _rank(), fmt, resume) if resume else path
        _, has_adapters = check_checkpoint(model_config, target, resume=bool(resume), declared_format=declared,
                                           adapters=adapters)
    except CheckpointError as err:
        raise UsageError(f"--load_checkpoint {path}: {err}") from err
    if is_semi_auto(config) and is_hf_folder(path):
        raise UsageError(f"--load_checkpoint {path}: semi-auto parallel loads through MindFormers' distributed "
                         f"loader, which cannot stack a Hugging Face folder's routed experts; convert it first "
                         f"(convert_weight.py --torch_ckpt_path {path} --mindspore_ckpt_path OUT_DIR/) and load "
                         f"OUT_DIR with auto_trans_ckpt True")
    if fmt == "bin" and declared == "ckpt":
        raise UsageError(f"load_ckpt_format is 'ckpt' but {path} is a Hugging Face folder of .bin files "
                         f"(set load_ckpt_format: safetensors, or leave it unset)")
    config.load_ckpt_format = declared or ("safetensors" if fmt == "bin" else fmt)
    logger.info(f"checkpoint {path} ({fmt}) holds every weight of the model"
                + (" and the LoRA adapters" if has_adapters else "")
                + (" and its optimizer state" if resume else ""))
    return has_adapters


def build_network(config, local=None):
    """The network as MindFormers' Trainer builds it from the YAML (registry, same default arguments), with
    ``local`` (what this process holds) given to the constructor."""
    from mindformers.core.parallel_config import build_parallel_config
    from mindformers.models import build_network as mf_build_network
    build_parallel_config(config)                    # parallel/recompute/moe sections as MindFormers' objects
    if local is not None:
        config.model.arch.local = local
    # LoRA is put on by this project (lora.apply_lora); MindFormers' get_pet_model, which build_network calls for a
    # pet_config, swaps only its own Linear classes and would then freeze every weight of this model
    pet_config = config.model.model_config.get("pet_config")
    config.model.model_config.pet_config = None
    try:
        return mf_build_network(config.model, default_args={
            "parallel_config": config.parallel_config, "moe_config": config.moe_config,
            "dataset_config": config.train_dataset,
            "calculate_per_token_loss": getattr(config, "calculate_per_token_loss", False)})
    finally:
        config.model.model_config.pet_config = pet_config
        if local is not None:
            del config.model.arch["local"]


def build_semi_auto_network(config):
    """The network of a semi-auto/auto parallel run: built with ``training_local_shape``, then laid out."""
    from .parallel import apply_semi_auto, parallel_sizes, training_local_shape
    from mindformers.core.parallel_config import build_parallel_config
    build_parallel_config(config)
    sizes = parallel_sizes(config.parallel_config)
    network = build_network(config, training_local_shape(sizes, semi_auto=True))
    applied = apply_semi_auto(network, sizes)
    logger.info(f"semi-auto layout: {len(applied)} op strategies set for dp {sizes.dp}, mp {sizes.mp}, ep {sizes.ep}")
    return network


def build_loaded_network(config, has_adapters: bool = False):
    """Standalone and data-parallel runs starting from a checkpoint: the network built here and every weight
    loaded by ``checkpoint_io.load_checkpoint`` (streamed shard by shard; a Hugging Face folder's experts stacked
    on the way); the Trainer is then given the network and no checkpoint. Each data-parallel rank loads it all."""
    from .checkpoint_io import build_empty, load_checkpoint
    network = build_empty(build_network, config)     # no random fill: the checkpoint gives every weight
    path = config.load_checkpoint
    pet_config = pet_config_of(config)
    with_adapters = bool(pet_config) and has_adapters
    if with_adapters:                                # a LoRA output: base and adapters both come from it
        apply_lora_logged(network, pet_config)
    try:
        loaded = load_checkpoint(network, path)
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
    from .lora import PetConfigError, apply_lora
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
    ``.ckpt`` (same tensors, bits and step counters) under output_dir/resume_staging/rank_0 and resumed from there.
    """
    import mindspore as ms
    path = config.load_checkpoint
    source = resume_file(path, _rank(), "safetensors", config.resume_training)
    folder = os.path.join(config.output_dir or "./output", "resume_staging", "rank_0")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, os.path.basename(source)[:-len(".safetensors")] + ".ckpt")
    partial = target[:-len(".ckpt")] + ".partial.ckpt"    # save_checkpoint appends .ckpt to any other name
    try:
        ms.save_checkpoint(ms.load_checkpoint(source, format="safetensors"), partial)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    logger.info(f"resuming from {source} (rewritten as {target} for MindFormers' .ckpt resume)")
    config.load_checkpoint = os.path.dirname(folder)
    config.load_ckpt_format = "ckpt"
    if isinstance(config.resume_training, str):
        config.resume_training = True


def run_training(config):
    """Check the checkpoint, build the context from the YAML and train; finetune starts from load_checkpoint."""
    import mindspore as ms
    from mindformers import Trainer
    from mindformers.core.context import build_context
    from .cpu_collectives import install_cpu_barrier

    if config.get("output_dir"):
        config.output_dir = os.path.abspath(config.output_dir)
    pet_config_of(config)                              # a bad pet_config field: refused before anything starts
    has_adapters = check_run_checkpoint(config)       # nothing started, nothing written if it is refused
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
    elif config.get("load_checkpoint") and not resume:
        network = build_loaded_network(config, has_adapters)
    else:
        # the Trainer builds the network (and resumes, if asked); a LoRA run builds it here, with its adapters
        network = None
        if pet_config:
            network = build_network(config)
            apply_lora_logged(network, pet_config)
        if resume and config.load_ckpt_format == "safetensors" and not config.get("use_parallel"):
            stage_safetensors_resume(config)
    if pet_config:
        config.model.model_config.pet_config = None    # applied: MindFormers must not apply its own on top
    trainer = Trainer(args=config, task="text_generation", model=network)
    logger.info(f"{config.run_mode}: model {config.model.arch.type}, data "
                f"{config.train_dataset.data_loader.dataset_dir}, output {config.output_dir}")
    checkpoint = config.load_checkpoint or False
    if config.run_mode == "finetune":
        trainer.finetune(finetune_checkpoint=checkpoint, resume_training=resume)
    else:
        trainer.train(train_checkpoint=checkpoint, resume_training=resume)
    return trainer
