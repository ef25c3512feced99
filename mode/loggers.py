"""Experiment logging: W&B (offline unless told otherwise) or nothing. Only rank 0 logs."""

from __future__ import annotations

import os


class NullLogger:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, cfg, run_dir: str, config: dict, name: str):
        import wandb

        self.wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.project, entity=cfg.get("entity"), group=cfg.get("group"), name=name,
            tags=list(cfg.get("tags") or []), mode=cfg.get("mode", "offline"), dir=run_dir,
            config=config, reinit="finish_previous",
        )

    def log(self, metrics, step=None):
        self.run.log(metrics, step=step)

    def summary(self, metrics):
        for key, value in metrics.items():
            self.run.summary[key] = value

    def table(self, name, columns, rows):
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)})

    def finish(self):
        self.run.finish()


def make_logger(cfg, run_dir: str, config: dict, name: str, is_main: bool = True):
    if not is_main or cfg.logger.name == "none":
        return NullLogger()
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg.logger, run_dir, config, name)
    from mode.errors import ModeError

    raise ModeError(f"logger={cfg.logger.name!r} is not one of ['none', 'wandb']")
