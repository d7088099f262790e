"""The pure Skeleton-of-Thought algorithm: prompts, skeleton parsing, answer assembly. No I/O here."""

from sot.core.assemble import assemble_answer, clean_point_text
from sot.core.prompts import PromptSet, builtin_prompt_set, load_prompt_set
from sot.core.skeleton import SkeletonParse, parse_skeleton

__all__ = [
    "PromptSet",
    "SkeletonParse",
    "assemble_answer",
    "builtin_prompt_set",
    "clean_point_text",
    "load_prompt_set",
    "parse_skeleton",
]
