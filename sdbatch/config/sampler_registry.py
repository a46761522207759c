"""Sampler registry: every user-facing sampler name → diffusers scheduler class, its options and labels.

Plain data, no torch: config validation and metadata use it without loading anything; the engine
builds the scheduler from it (`sdbatch.engine.core.scheduler_factory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from sdbatch.errors import ConfigError

# The reference tool's shared scheduler settings (gen_img_inventory.md §6): SD's training schedule.
BASE_CONFIG = MappingProxyType(
    {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
)

SCHEDULES = ("default", "karras", "exponential")

# The fewest sampler.steps each sampler runs without diffusers failing (checked for every registry sampler with
# diffusers 0.42): PNDM/PLMS need their 4-step warm-up (set_timesteps(3) builds a schedule that step() fails
# on); the others run from 1 step. Used by the run's step check and by every stage that sets its own steps.
MIN_STEPS = {"pndm": 4, "plms": 4}
_SIGMA_SCHEDULES = ("default", "karras", "exponential")  # schedulers with use_*_sigmas switches


@dataclass(frozen=True, slots=True)
class SamplerEntry:
    """One sampler: which diffusers scheduler, how it is configured, how A1111 names it."""

    scheduler: str  # diffusers class name
    a1111: str  # A1111 "Sampler:" label
    options: dict = field(default_factory=dict)  # constructor kwargs on top of BASE_CONFIG
    schedules: tuple[str, ...] = ("default",)  # sampler.schedule values it supports
    default_schedule: str = "default"  # what the name implies (dpmpp_2m_karras → karras)


def _entry(scheduler: str, a1111: str, schedules: tuple[str, ...] = _SIGMA_SCHEDULES, **options) -> SamplerEntry:
    return SamplerEntry(scheduler, a1111, {"steps_offset": 1, **options}, schedules)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

_BASE: dict[str, SamplerEntry] = {
    # names of the reference tool (gen_img.py --sampler)
    "ddim": _entry("DDIMScheduler", "DDIM", ("default",), clip_sample=False, set_alpha_to_one=True),
    "pndm": _entry("PNDMScheduler", "PLMS", ("default",)),
    "lms": _entry("LMSDiscreteScheduler", "LMS"),
    "euler": _entry("EulerDiscreteScheduler", "Euler"),
    "euler_a": _entry("EulerAncestralDiscreteScheduler", "Euler a", ("default",)),
    "heun": _entry("HeunDiscreteScheduler", "Heun"),
    "dpm_2": _entry("KDPM2DiscreteScheduler", "DPM2"),
    "dpm_2_a": _entry("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    # diffusers refuses a zero final sigma for first-order-data DPM-Solver; sigma_min is its supported end
    "dpmsolver": _entry("DPMSolverMultistepScheduler", "DPM-Solver 2M", algorithm_type="dpmsolver",
                        solver_order=2, final_sigmas_type="sigma_min"),
    "dpmsolver++": _entry("DPMSolverMultistepScheduler", "DPM++ 2M", **_DPMPP_2M),
    # dpmsingle takes no steps_offset (neither does the reference). It is deterministic DPM-Solver++(2S): A1111's
    # "DPM++ 2S a" at eta 0 (a1111_eta writes "Eta: 0"; A1111's own default is eta 1, ancestral)
    "dpmsingle": SamplerEntry("DPMSolverSinglestepScheduler", "DPM++ 2S a",
                              {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": False},
                              _SIGMA_SCHEDULES),
    "unipc": _entry("UniPCMultistepScheduler", "UniPC"),
    # A1111 names (ecosystem_notes.md §1(e)) that diffusers can run
    "dpmpp_2m": _entry("DPMSolverMultistepScheduler", "DPM++ 2M", **_DPMPP_2M),
    "dpmpp_2m_sde": _entry("DPMSolverMultistepScheduler", "DPM++ 2M SDE", **_DPMPP_2M_SDE),
    "deis": _entry("DEISMultistepScheduler", "DEIS"),
}

# aliases: the reference's k_* names, A1111's PLMS
_ALIASES = {"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2",
            "k_dpm_2_a": "dpm_2_a", "plms": "pndm"}

# A1111 legacy names that carry their schedule ("DPM++ 2M Karras")
_WITH_SCHEDULE = {"dpmpp_2m_karras": ("dpmpp_2m", "karras"), "dpmpp_2m_sde_karras": ("dpmpp_2m_sde", "karras"),
                  "lms_karras": ("lms", "karras"), "dpm_2_karras": ("dpm_2", "karras"),
                  "dpm_2_a_karras": ("dpm_2_a", "karras"), "euler_karras": ("euler", "karras"),
                  "heun_karras": ("heun", "karras"), "dpmpp_2m_sde_exponential": ("dpmpp_2m_sde", "exponential")}


def _build() -> dict[str, SamplerEntry]:
    table = dict(_BASE)
    table.update({alias: _BASE[target] for alias, target in _ALIASES.items()})
    for name, (base, schedule) in _WITH_SCHEDULE.items():
        entry = _BASE[base]
        table[name] = SamplerEntry(entry.scheduler, entry.a1111, entry.options, entry.schedules, schedule)
    return table


SAMPLERS: MappingProxyType[str, SamplerEntry] = MappingProxyType(_build())


def get_sampler(name: str) -> SamplerEntry:
    """The registry entry for `name`; an unknown name lists the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"unknown sampler '{name}' <sampler.name>; choose one of: {', '.join(SAMPLERS)}") from None


def effective_schedule(name: str, schedule: str) -> str:
    """The schedule a sampler runs with: an explicit sampler.schedule wins over the one a name implies."""
    entry = get_sampler(name)
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{schedule}' <sampler.schedule>; choose one of: {', '.join(SCHEDULES)}")
    chosen = entry.default_schedule if schedule == "default" else schedule
    if chosen not in entry.schedules:
        raise ConfigError(
            f"sampler '{name}' does not support schedule '{chosen}' <sampler.schedule>; "
            f"it supports: {', '.join(entry.schedules)}"
        )
    return chosen


# the schedulers that can rescale their betas to zero terminal SNR (sampler.zero_terminal_snr)
ZERO_SNR_SCHEDULERS = frozenset({"DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                 "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"})


def check_zero_terminal_snr(name: str, v_prediction: bool) -> None:
    """ConfigError unless sampler `name` can run sampler.zero_terminal_snr on a v-prediction model."""
    if get_sampler(name).scheduler not in ZERO_SNR_SCHEDULERS:
        names = sorted(n for n, e in SAMPLERS.items() if e.scheduler in ZERO_SNR_SCHEDULERS)
        raise ConfigError(f"sampler.zero_terminal_snr=true does not work with sampler {name}; use one of "
                          f"{', '.join(names)}")
    if not v_prediction:
        raise ConfigError("sampler.zero_terminal_snr=true needs a v-prediction model (at zero SNR an epsilon model "
                          "predicts nothing); set model.v_parameterization=true")


def scheduler_options(name: str, schedule: str, v_prediction: bool,
                      zero_terminal_snr: bool = False) -> tuple[str, dict]:
    """(diffusers class name, constructor kwargs) for a sampler, schedule, prediction type and beta rescaling."""
    entry = get_sampler(name)
    options = {**BASE_CONFIG, **entry.options}
    chosen = effective_schedule(name, schedule)
    if chosen == "karras":
        options["use_karras_sigmas"] = True
    elif chosen == "exponential":
        options["use_exponential_sigmas"] = True
    if v_prediction:
        options["prediction_type"] = "v_prediction"
    if zero_terminal_snr:
        check_zero_terminal_snr(name, v_prediction)
        options["rescale_betas_zero_snr"] = True
    return entry.scheduler, options


# A1111 labels of what `sampler.schedule: default` runs (modules/sd_schedulers.py). A1111's "Automatic" is the
# sampler's own default, which for k-diffusion samplers is not always Uniform (DPM++ 2M, DPM2, DPM++ 2S a: Karras;
# DPM++ 2M SDE: Exponential), so the k-diffusion family writes "Uniform" (diffusers' linspace sigmas = k-diffusion's
# get_sigmas(n)). A1111's timestep samplers (DDIM, PLMS, UniPC) ignore Schedule type and run their own timesteps,
# which is what sdbatch's default runs too: "Automatic" is exact there.
_A1111_TIMESTEP_SAMPLERS = frozenset({"DDIM", "PLMS", "UniPC"})
_A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential"}


def a1111_name(name: str) -> str:
    """A1111's label for a sampler ("euler_a" → "Euler a"); sdbatch's own label where A1111 has no such sampler."""
    return get_sampler(name).a1111


def a1111_schedule(name: str, schedule: str) -> str:
    """A1111's "Schedule type" label for the schedule a sampler ran (`schedule`: effective_schedule's value).

    Always a label, never None: a missing Schedule type means A1111's "Automatic", which is not what ran.
    """
    if schedule != "default":
        return _A1111_SCHEDULES[schedule]
    return "Automatic" if a1111_name(name) in _A1111_TIMESTEP_SAMPLERS else "Uniform"


def a1111_eta(name: str, eta: float) -> dict[str, float]:
    """A1111's eta entry: `Eta DDIM` (its DDIM eta, written when not 0) or `Eta` (its k-diffusion samplers' eta,
    written when not 1). sdbatch passes sampler.eta to DDIM only; its ancestral/SDE samplers run at eta 1, and
    dpmsingle ("DPM++ 2S a") at eta 0."""
    label = a1111_name(name)
    if label == "DDIM":
        return {"Eta DDIM": eta} if eta else {}
    return {"Eta": 0} if label == "DPM++ 2S a" else {}
