"""The exception types users see.

Every problem caused by input (a bad file, an odd size, a mismatched model) is raised as PixArtError with a
message that says what was wrong and what to do about it. ComfyUI shows the message on the node, the CLI prints
it without a traceback.
"""


class PixArtError(Exception):
    """A user-facing error: the message names the input at fault and the fix."""


class Interrupted(Exception):
    """The user asked to stop (Cancel in ComfyUI, the interrupt check of the core's sampling loop); the work stops
    before the next model evaluation."""
