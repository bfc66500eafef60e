"""train / finetune through MindFormers' Trainer (CausalLanguageModelingTrainer).

The Trainer builds the network from the YAML (MindFormers' registry) and loads ``load_checkpoint`` into it, except
under semi-auto/auto parallel (Ascend training beyond data parallel): there the network is built here with the
data-parallel token groups of the capacity dispatch and laid out (``parallel.apply_semi_auto``) before the Trainer
compiles it. The model class itself reads no checkpoint and no parallel context.
"""
import os

from mindformers.tools.logger import logger

__all__ = ["run_training", "is_semi_auto", "build_semi_auto_network"]

_SEMI_AUTO_MODES = (1, 2, "semi_auto_parallel", "auto_parallel")


def is_semi_auto(config) -> bool:
    """True when the YAML asks for semi-auto/auto parallel (``use_parallel`` with ``parallel.parallel_mode`` 1 or 2)."""
    return bool(config.get("use_parallel")) and (config.get("parallel") or {}).get("parallel_mode", 0) in \
        _SEMI_AUTO_MODES


def build_semi_auto_network(config):
    """The network of a semi-auto/auto parallel run: built as the Trainer builds it (registry, same default
    arguments), with ``training_local_shape`` given to the constructor, then laid out."""
    from mindformers.core.parallel_config import build_parallel_config
    from mindformers.models import build_network
    from .parallel import apply_semi_auto, parallel_sizes, training_local_shape
    build_parallel_config(config)                    # parallel/recompute/moe sections as MindFormers' objects
    sizes = parallel_sizes(config.parallel_config)
    config.model.arch.local = training_local_shape(sizes, semi_auto=True)   # a constructor argument of the model
    network = build_network(config.model, default_args={
        "parallel_config": config.parallel_config, "moe_config": config.moe_config,
        "dataset_config": config.train_dataset,
        "calculate_per_token_loss": getattr(config, "calculate_per_token_loss", False)})
    del config.model.arch["local"]
    applied = apply_semi_auto(network, sizes)
    logger.info(f"semi-auto layout: {len(applied)} op strategies set for dp {sizes.dp}, mp {sizes.mp}, ep {sizes.ep}")
    return network


def run_training(config):
    """Build the context from the YAML and train; finetune starts from config.load_checkpoint."""
    import mindspore as ms
    from mindformers import Trainer
    from mindformers.core.context import build_context
    from .cpu_collectives import install_cpu_barrier

    if config.get("output_dir"):
        config.output_dir = os.path.abspath(config.output_dir)
    build_context(config)
    install_cpu_barrier()   # CPU + msrun: MindFormers' checkpoint-loading barrier() as an AllReduce
    if config.get("seed") is not None:
        ms.set_seed(int(config.seed))
    network = build_semi_auto_network(config) if is_semi_auto(config) else None
    trainer = Trainer(args=config, task="text_generation", model=network)
    logger.info(f"{config.run_mode}: model {config.model.arch.type}, data "
                f"{config.train_dataset.data_loader.dataset_dir}, output {config.output_dir}")
    if config.run_mode == "finetune":
        trainer.finetune(finetune_checkpoint=config.load_checkpoint or False,
                         resume_training=bool(config.get("resume_training")))
    else:
        trainer.train(train_checkpoint=config.load_checkpoint or False,
                      resume_training=bool(config.get("resume_training")))
    return trainer
