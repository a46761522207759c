"""The regions node: Attention Couple's region masks (regions.mask, regions.max_color_codes) and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from sdbatch.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RegionsConfig:
    """Region masks for prompts with AND parts (Attention Couple)."""

    # a colour image, or a folder used in turn (image k of the run takes mask k); part i of an AND prompt is
    # channel i (R, G, B; grey = soft weight), or with max_color_codes the pixels of colour code i + 1
    mask: str | None = None
    # 1..7: read the mask by colour codes (1 red, 2 green, 3 yellow, 4 blue, 5 magenta, 6 cyan, 7 white) for the
    # first N parts (the reference's --network_regional_mask_max_color_codes); null = by channel
    max_color_codes: int | None = None

    def check(self) -> None:
        codes = self.max_color_codes
        if codes is not None and not 1 <= codes <= 7:
            raise ConfigError(f"regions.max_color_codes must be from 1 to 7 (the colour codes red ... white), "
                              f"got {codes}")
        if codes is not None and self.mask is None:
            raise ConfigError("regions.max_color_codes needs regions.mask (the colour-coded mask image)")
