"""``profile`` and ``memory_profiling``: traces of the steps profile_step_start..stop.

NeoX marks nsys ranges (``profile``) and dumps CUDA memory snapshots
(``memory_profiling``). Here ``profile`` runs ``torch.profiler`` over those steps and
writes a Chrome/Perfetto trace (open in https://ui.perfetto.dev or chrome://tracing):
``<log_dir>/profile/rank00000_steps{a}-{b}.json``, rank 0 only (a trace per rank of a
large job would be huge). ``memory_profiling`` records the CUDA allocator history over
the same steps and writes ``<memory_profiling_path or log_dir/memory>/rank{R}_steps{a}-{b}.pickle``
on every rank (open with https://pytorch.org/memory_viz); on CPU, where there is no
allocator history, it adds memory columns to the profiler trace instead.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class StepProfiler:
    """Call :meth:`at_step` with the step about to run, and :meth:`close` at the end."""

    def __init__(self, args):
        self.args = args
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.first, self.last = args.profile_step_start, args.profile_step_stop
        cuda = torch.cuda.is_available()
        self.cuda_memory = args.memory_profiling and cuda
        self.trace = (args.profile or (args.memory_profiling and not cuda)) and self.rank == 0
        self.profiler = None
        self.recording = False
        log_dir = args.log_dir or "logs"
        self.trace_dir = os.path.join(log_dir, "profile")
        self.memory_dir = args.memory_profiling_path or os.path.join(log_dir, "memory")

    def at_step(self, step: int) -> None:
        if step == self.first:
            self._start()
        elif step == self.last + 1:
            self.close()

    def _start(self) -> None:
        if self.trace:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True,
                                                   profile_memory=self.args.memory_profiling)
            self.profiler.start()
        if self.cuda_memory:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self.recording = True

    def close(self) -> None:
        """Stop and write whatever is running (also when training ends inside the range)."""
        name = f"rank{self.rank:05d}_steps{self.first}-{self.last}"
        if self.profiler is not None:
            self.profiler.stop()
            os.makedirs(self.trace_dir, exist_ok=True)
            path = os.path.join(self.trace_dir, name + ".json")
            self.profiler.export_chrome_trace(path)
            print(f"profile of steps {self.first}-{self.last} written to {path}", flush=True)
            self.profiler = None
        if self.recording:
            os.makedirs(self.memory_dir, exist_ok=True)
            torch.cuda.memory._dump_snapshot(os.path.join(self.memory_dir, name + ".pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False
