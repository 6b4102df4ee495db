"""A loaded model and its one forward path: ``LoadedModel`` holds a network in eval mode on its device with what it
expects of its input (``prepare``) and gives back (``hidden_states``). A MERT-v1 ``HubertModel`` runs its
convolutional front end one window at a time (``hubert_hidden_states``), any other network through its own
``forward``; every caller, the extractor and the benchmarks alike, asks ``hidden_states`` and gets the same numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mess_ai.errors import ModelError

if TYPE_CHECKING:
    import torch

# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm adds this to the variance; MERT was trained behind that extractor.
_NORM_EPSILON = 1e-7


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on ``device``, with what it expects of its input and what it gives back."""

    model: torch.nn.Module
    name: str
    revision: str | None
    device: torch.device
    sampling_rate: int
    do_normalize: bool
    num_hidden_states: int
    hidden_size: int
    source_dir: Path

    def prepare(self, windows: torch.Tensor) -> torch.Tensor:
        """Model input for ``windows``: float32 [batch, samples] at ``sampling_rate`` -> float32 [batch, samples].

        Does what the checkpoint's Wav2Vec2FeatureExtractor does: when ``do_normalize``, each window separately to zero
        mean and unit (population) variance; otherwise nothing. The result is on ``device``.
        """
        if windows.ndim != 2:
            raise ValueError(f"windows must be [batch, samples]; got shape {tuple(windows.shape)}.")
        import torch

        values = windows.to(device=self.device, dtype=torch.float32)
        if not self.do_normalize:
            return values
        mean = values.mean(dim=1, keepdim=True)
        variance = values.var(dim=1, keepdim=True, correction=0)
        return (values - mean) / torch.sqrt(variance + _NORM_EPSILON)

    def hidden_states(self, input_values: torch.Tensor) -> torch.Tensor:
        """Every layer's output: input_values float32 [batch, samples] on ``device`` ->
        float32 [batch, num_hidden_states, frames, hidden_size] (index 0 is the input to the first transformer layer).

        Computed by ``hubert_hidden_states`` where ``runs_front_end_per_window(self.model)``, else by
        ``self.model(input_values, output_hidden_states=True)``.
        """
        import torch

        with torch.inference_mode():
            if runs_front_end_per_window(self.model):
                return hubert_hidden_states(self.model, input_values)
            output = self.model(input_values, output_hidden_states=True)
            states = getattr(output, "hidden_states", None)
            if states is None:
                raise ModelError(f"Model {self.name} returned no hidden states; it cannot give per-layer features.")
            if len(states) != self.num_hidden_states:
                raise ModelError(f"Model {self.name} returned {len(states)} hidden states; its config promises "
                                 f"{self.num_hidden_states}.")
            return torch.stack(states, dim=1)


def runs_front_end_per_window(net: torch.nn.Module) -> bool:
    """Whether ``LoadedModel.hidden_states`` computes ``net``'s hidden states with ``hubert_hidden_states``: only for
    a ``HubertModel`` in eval mode with the post-norm encoder (MERT-v1's), whose forward that function reproduces.

    transformers is looked up, not imported: a process that holds a ``HubertModel`` has imported it already, and
    importing it costs seconds.
    """
    hubert = sys.modules.get("transformers.models.hubert.modeling_hubert")
    return (hubert is not None and isinstance(net, hubert.HubertModel)
            and type(net.encoder) is hubert.HubertEncoder and not net.training)


def hubert_hidden_states(net: torch.nn.Module, input_values: torch.Tensor) -> torch.Tensor:
    """What ``net(input_values, output_hidden_states=True)`` gives a ``HubertModel`` in eval mode, stacked, with the
    convolutional front end run one window at a time: input_values float32 [batch, samples] ->
    float32 [batch, num_hidden_layers + 1, frames, hidden_size].

    The front end's first convolution and its group norm each output float32 [batch, 512, samples / 5]: 187 MiB
    apiece for a batch of 4 five-second windows, the largest tensors of the whole pass and the pipeline's memory
    peak. Group norm normalises each window on its own, so a window alone gets the same numbers as in a batch; the
    transformer after it still runs on the whole batch. The rest is ``HubertModel.forward`` without an attention
    mask (its SpecAugment masking acts only in training), and ``HubertEncoder``'s hidden states: its input after
    the positional convolution, layer norm and dropout, then each layer's output.
    """
    import torch

    features = torch.cat([net.feature_extractor(input_values[i:i + 1]) for i in range(len(input_values))])
    hidden = net.feature_projection(features.transpose(1, 2))
    encoder = net.encoder
    hidden = encoder.dropout(encoder.layer_norm(hidden + encoder.pos_conv_embed(hidden)))
    states = [hidden]
    for layer in encoder.layers:
        output = layer(hidden, attention_mask=None)
        hidden = output[0] if isinstance(output, tuple) else output  # transformers 4.x layers return a tuple
        states.append(hidden)
    return torch.stack(states, dim=1)
