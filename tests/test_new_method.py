"""Adding a method touches only its file and one registry line: a 30-line method registered here, inside the test,
runs through the registry-parametrised tests (roles, export, untrained export, resume) like the shipped four."""

from dataclasses import dataclass

import pytest
import torch

from distill_diffusion.method import Batch, Method, MethodSpec, SamplingSpec, StepSampling, masked_mean
from methods import METHODS
from tests import test_methods, test_resume


# ---- the new method: its whole file -------------------------------------------------------------------------------
@dataclass
class X0MatchConfig:
    t: int = 999  # the one timestep the student learns to denoise from
    guidance: float = 2.0  # the teacher's CFG (diffusers convention)


class X0Match(Method):
    """One-step regression onto the guided teacher's x0 at a single timestep (a toy, not a paper)."""

    Config = X0MatchConfig

    @classmethod
    def spec(cls, cfg: X0MatchConfig, student: str) -> MethodSpec:
        return MethodSpec(roles=("student",), needs_images=False)

    def loss(self, role: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.models
        b = len(batch)
        xt = batch.rng.randn(m.latent_shape, "x0match-noise")
        t = torch.full((b,), self.cfg.t, device=m.device)
        with torch.no_grad():
            x0_teacher, _ = m.predict("teacher", xt, t, batch.cond, batch.uncond, guidance=self.cfg.guidance)
        x0_student, _ = m.predict("student", xt, t, batch.cond)
        loss, _ = masked_mean(((x0_student - x0_teacher) ** 2).flatten(1).mean(1))
        return loss, {}

    def sampling(self) -> SamplingSpec:
        return SamplingSpec(steps={1: StepSampling("LCMScheduler", [self.cfg.t])}, default_steps=1)
# ---- end of the method's file; registering it is one line: METHODS["x0match"] = X0Match ---------------------------


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "x0match", X0Match)
    return "x0match"


@pytest.mark.parametrize("student", ["lora", "full"])
def test_roles_move_only_their_tensors(registered, student, tiny_teachers):
    test_methods.test_roles_move_only_their_tensors(registered, student, tiny_teachers)


def test_export_and_untrained_export(registered, tiny_teachers, image_folder, tmp_path):
    test_methods.test_export_samples_at_every_step_count(registered, tiny_teachers, tmp_path / "a")
    test_methods.test_export_initial_writes_the_untrained_student(registered, tiny_teachers, image_folder,
                                                                  tmp_path / "b")


@pytest.mark.slow
def test_resume_equals_uninterrupted(registered, tiny_teachers, image_folder, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"  # the resume test's data-free runs read <images>/../prompts.txt
    prompts.write_text("a red square\na blue circle\n")
    (tmp_path / "x").mkdir()
    test_resume.test_resume_equals_uninterrupted(registered, tiny_teachers, str(tmp_path / "x"), prompts, tmp_path,
                                                 monkeypatch)
