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
            config=config, reinit="finish_previous", id=run_id(run_dir), resume="allow",
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


WANDB_ID_FILE = "wandb_run_id"


def run_id(run_dir: str) -> str:
    """The W&B run id of this run folder, created once: a resumed run continues the same W&B run."""
    from pathlib import Path

    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    import secrets

    new = secrets.token_hex(4)
    path.write_text(new + "\n")
    return new


def make_logger(cfg, run_dir: str, config: dict, name: str, is_main: bool = True):
    if not is_main or cfg.logger.name == "none":
        return NullLogger()
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg.logger, run_dir, config, name)
    from mode.errors import ModeError

    raise ModeError(f"logger={cfg.logger.name!r} is not one of ['none', 'wandb']")
