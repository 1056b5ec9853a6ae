"""A one-call GPU readiness check of the project (issue #14): ``make gpu-check``.

:mod:`.main` runs the sections of :mod:`.sections` (and the GPU-marked tests, and each config's
tiny run) one process each under its own timeout and writes one JSON and one log;
:mod:`.summary` renders the JSON as the table printed at the end. On a machine without a GPU the
same sections run at tiny sizes with the kernels in Pallas interpret mode (what the test runs).
README.md ("GPU") gives the device command.
"""
