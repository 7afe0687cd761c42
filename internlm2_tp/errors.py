"""The errors the job reports in one line, without a traceback, and their exit codes.

`UserError` (exit 2) is every error that means the job cannot run as asked: a setting, an input,
an output directory, a checkpoint, a tokenizer, a device, a store or a Ray cluster that cannot be
used. Its message names the culprit (key, file, column, row id, tensor, URI or address), and it is
raised before expensive work wherever the fact can be known then. `JobFailed` (exit 1): the job
ran and could not finish (a group lost past its restarts). `GroupFailed`: one tensor-parallel group
died, failed or hung; the driver rebuilds it. In every case finished rows are already in whole
shards, so rerunning the same command resumes.

This module imports nothing of the project: every other module may raise these.
"""
from __future__ import annotations

import time

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(Exception):
    """The job cannot run as asked; the message names the culprit. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class JobConfigError(UserError, ValueError):
    """A bad job setting (a `key=value` or conf/*.yaml); the message names the key."""


class ConfigError(UserError, ValueError):
    """A config.json that cannot describe a model we can run; the message names the field."""


class CheckpointError(UserError, ValueError):
    """A checkpoint we refuse to read; the message names the file and/or tensor."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used; the message names the file and the field."""


class ChatTemplateError(UserError):
    """A chat template that cannot be used (bad syntax, or a reach for Python internals); the
    message names its file. Not a ValueError: it stops the job, it is not one row's fault."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the job was pointed at does not exist."""


class InputError(UserError, ValueError):
    """A job-level input problem (files, schemas, ids): the job must not start."""


class OutputDirError(UserError, ValueError):
    """The output directory cannot be used as asked (foreign files, another job's, corrupt shards)."""


class StorageError(UserError, ValueError):
    """A store cannot be used as asked (unreachable, refused, missing bucket, no permission)."""


class DeviceError(UserError, RuntimeError):
    """The device settings cannot work; the message names the setting or variable."""


class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot be used (gone, silent, refusing, or too small)."""


class JobFailed(RuntimeError):
    """The job ran and could not finish (exit code 1); finished rows are saved."""


class GroupFailed(RuntimeError):
    """A rank of a group died, failed or hung; the group must be rebuilt."""


class PlacementTimeout(GroupFailed):
    """Ray did not place the group within parallel.timeout_s: retrying would wait again."""


class NodeLost(GroupFailed):
    """The group's node went away (a crash, a spot node taken back): capacity lost, not a failure
    of the group itself, so it does not count against ray.max_group_restarts."""

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(message)
        self.node = node
        self.at = time.time()   # when the job found out
