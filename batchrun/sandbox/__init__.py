"""The sandbox: an emulator of RunComfy's Model API with fault knobs, for tests and `--sandbox` runs."""

from .model import MODEL_ID, input_sha256
from .queue import Job, SimQueue, ideal_makespan
from .server import Faults, Sandbox, serve_forever

__all__ = ["MODEL_ID", "Faults", "Job", "Sandbox", "SimQueue", "ideal_makespan", "input_sha256", "serve_forever"]
