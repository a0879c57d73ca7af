"""One vocabulary tensor's inputs as row blocks in output-vocabulary order, every gap filled, never with zeros.

A model that lacks a token takes no part in its row: it gets the base's row (so its delta is zero) or, without a
base, the weighted mean of the models that have it. A configured token (`tokenizer.tokens`) gets its source's row in
the models that lack it (in every model when forced). Padding rows, rows no model has and `{kind: zero}` rows get
each model's mean row, as mergekit pads: the mean of its rows of the output vocabulary.
"""

import numpy as np
import torch

from mergebot.errors import ModelError
from mergebot.merge.io import TensorInfo, TensorReader
from mergebot.merge.plan import Plan, TensorPlan


class AlignedRows:
    def __init__(
        self,
        plan: Plan,
        tensor: TensorPlan,
        infos: list[TensorInfo],
        maps: list[np.ndarray | None],
        reader: TensorReader,
        block_rows: int,
    ):
        self.reader = reader
        self.infos = infos
        self.maps = [torch.from_numpy(m) if m is not None else None for m in maps]
        self.block_rows = block_rows
        self.name = tensor.output.name
        self.uses_base = plan.method.uses_base
        self.fill_weights = [float(p.get("weight", 1.0)) for p in tensor.params.per_model]
        inputs = [ref.model for ref in tensor.inputs]
        self.overrides = {
            row: (inputs.index(t.model) if t.model is not None else None, t.row, t.force)
            for row, t in plan.vocab.overrides.items()
        }
        rows = tensor.output.shape[0]
        self.token_rows = min(rows, plan.vocab.token_rows or rows)
        self._source_rows: dict[tuple[int, int], torch.Tensor] = {}
        self._means: list[torch.Tensor] | None = None

    def block(self, start: int, stop: int) -> list[torch.Tensor]:
        values, needs_mean = self._aligned(start, stop)
        if any(mask.any() for mask in needs_mean):
            for value, mask, mean in zip(values, needs_mean, self._mean_rows(), strict=True):
                value[mask] = mean
        return values

    def _aligned(self, start: int, stop: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The rows [start, stop) of each input, and per input the rows that are to take its mean row."""
        gathered = [self._gather(info, m, start, stop) for info, m in zip(self.infos, self.maps, strict=True)]
        values = [g[0] for g in gathered]
        present = [g[1] for g in gathered]
        nobody = self._fill(values, present)
        needs_mean = [nobody.clone() for _ in values]
        for row, (source, source_row, force) in self.overrides.items():
            if not start <= row < stop:
                continue
            for index, value in enumerate(values):
                if force or not present[index][row - start]:
                    needs_mean[index][row - start] = source is None
                    if source is not None:
                        value[row - start] = self._source_row(source, source_row)
        if stop > self.token_rows:
            for mask in needs_mean:
                mask[max(0, self.token_rows - start) :] = True
        return values, needs_mean

    def _gather(self, info: TensorInfo, mapping: torch.Tensor | None, start: int, stop: int):
        if mapping is None:
            return self.reader.rows(info, start, stop), torch.ones(stop - start, dtype=torch.bool)
        wanted = mapping[start:stop]
        present = wanted >= 0
        out = torch.zeros((stop - start, *info.row_shape), dtype=torch.float32)
        if present.any():
            needed = torch.unique(wanted[present])
            breaks = torch.nonzero(needed[1:] != needed[:-1] + 1).flatten() + 1
            runs = torch.tensor_split(needed, breaks)
            chunk = torch.cat([self.reader.rows(info, int(run[0]), int(run[-1]) + 1) for run in runs])
            out[present] = chunk[torch.searchsorted(needed, wanted[present])]
        return out, present

    def _fill(self, values: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """Fill each model's missing rows from the others; returns the rows that no model has."""
        members = range(1, len(values)) if self.uses_base else range(len(values))
        weights = self.fill_weights if len(self.fill_weights) == len(members) else [1.0] * len(members)
        total = torch.zeros_like(values[0])
        weight_sum = torch.zeros(values[0].shape[0])
        for index, weight in zip(members, weights, strict=True):
            mask = present[index].to(torch.float32) * weight
            total += values[index] * mask.reshape(-1, *([1] * (values[0].dim() - 1)))
            weight_sum += mask
        usable = weight_sum.abs() > 1e-12
        mean_of_present = total / torch.where(usable, weight_sum, 1.0).reshape(-1, *([1] * (values[0].dim() - 1)))
        anchor = values[0] if self.uses_base else mean_of_present
        anchor_present = present[0] if self.uses_base else usable
        if self.uses_base:
            missing_base = ~present[0] & usable
            values[0][missing_base] = mean_of_present[missing_base]
            anchor_present = present[0] | usable
        for index in members:
            gap = ~present[index]
            values[index][gap] = anchor[gap]
        return ~anchor_present

    def _source_row(self, source: int, row: int) -> torch.Tensor:
        if (source, row) not in self._source_rows:
            self._source_rows[(source, row)] = self.reader.rows(self.infos[source], row, row + 1)[0]
        return self._source_rows[(source, row)]

    def _mean_rows(self) -> list[torch.Tensor]:
        """Per input, the mean of its aligned rows of the output vocabulary (rows taking a mean left out)."""
        if self._means is None:
            sums = [torch.zeros(info.row_shape, dtype=torch.float64) for info in self.infos]
            counts = [0] * len(self.infos)
            for start in range(0, self.token_rows, self.block_rows):
                values, needs_mean = self._aligned(start, min(start + self.block_rows, self.token_rows))
                for index, (value, mask) in enumerate(zip(values, needs_mean, strict=True)):
                    sums[index] += value[~mask].double().sum(0)
                    counts[index] += int((~mask).sum())
            if not all(counts):
                raise ModelError(f"tensor {self.name}: no row of the output vocabulary has a token of the models")
            self._means = [(total / count).to(torch.float32) for total, count in zip(sums, counts, strict=True)]
        return self._means
