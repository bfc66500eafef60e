"""train / finetune through MindFormers' Trainer (CausalLanguageModelingTrainer)."""
import os

from mindformers.tools.logger import logger


def run_training(config):
    """Build the context from the YAML and train; finetune starts from config.load_checkpoint."""
    import mindspore as ms
    from mindformers import Trainer
    from mindformers.core.context import build_context

    if config.get("output_dir"):
        config.output_dir = os.path.abspath(config.output_dir)
    build_context(config)
    if config.get("seed") is not None:
        ms.set_seed(int(config.seed))
    trainer = Trainer(args=config, task="text_generation")
    logger.info(f"{config.run_mode}: model {config.model.arch.type}, data "
                f"{config.train_dataset.data_loader.dataset_dir}, output {config.output_dir}")
    if config.run_mode == "finetune":
        trainer.finetune(finetune_checkpoint=config.load_checkpoint or False,
                         resume_training=bool(config.get("resume_training")))
    else:
        trainer.train(train_checkpoint=config.load_checkpoint or False,
                      resume_training=bool(config.get("resume_training")))
    return trainer
