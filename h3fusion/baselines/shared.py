"""What the baselines of one `run_baselines` call share: the base model loaded once with every expert's adapter
(`expert_bank`: n experts cost one model), the token ensembles made from it, the judges and the experts' cached
answers (the generation cache under their identities), each made on first use (`SharedExperts`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from h3fusion.baselines.answers import expert_identities, known_answers
from h3fusion.config import Profile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from h3fusion.baselines.answers import KnownAnswers
    from h3fusion.baselines.ensembles import AdapterBank, TokenEnsemble, Weighting


def expert_bank(profile: Profile) -> tuple[AdapterBank, PreTrainedTokenizerBase]:
    """The base model loaded once with every expert's adapter (named after its task)."""
    from h3fusion.baselines.ensembles import AdapterBank
    from h3fusion.evaluation.registry import inference_device
    from h3fusion.experts import check_experts_fit, expert_dir
    from h3fusion.models import load_base

    expert_identities(profile)
    check_experts_fit(profile, profile.expert_names)
    model, tok = load_base(profile)
    bank = AdapterBank(
        model.to(inference_device()), {e: expert_dir(profile, e) for e in profile.expert_names}
    )
    return bank, tok


@dataclass
class SharedExperts:
    """What the baselines of one `run_baselines` call share, each made on first use: the expert bank (n experts
    cost one model), the uniform mixture (its MC scores serve ensemble-uniform and ensemble-select), the
    judges, and the experts' answers in the generation cache."""

    profile: Profile
    judges: Any = None
    _bank: tuple[AdapterBank, PreTrainedTokenizerBase] | None = field(default=None, init=False)
    _mixture: TokenEnsemble | None = field(default=None, init=False)
    _token_logprobs: dict[Any, Any] = field(default_factory=dict, init=False)
    _known: KnownAnswers | None = field(default=None, init=False)

    def bank(self) -> tuple[AdapterBank, PreTrainedTokenizerBase]:
        if self._bank is None:
            self._bank = expert_bank(self.profile)
        return self._bank

    def mixture(self) -> TokenEnsemble:
        if self._mixture is None:
            self._mixture = self.token_ensemble("uniform", 1.0)
        return self._mixture

    def token_ensemble(self, weighting: Weighting, temperature: float) -> TokenEnsemble:
        """A token-level ensemble of the shared bank; all of them share the experts' MC token log-probabilities."""
        from h3fusion.baselines.ensembles import TokenEnsemble
        from h3fusion.evaluation.logprob_cache import profile_cache

        bank, tok = self.bank()
        return TokenEnsemble(
            bank,
            tok,
            weighting=weighting,
            temperature=temperature,
            token_logprobs=self._token_logprobs,
            expert_logprobs=(profile_cache(self.profile.run_dir), expert_identities(self.profile)),
        )

    def get_judges(self) -> Any:
        if self.judges is None:
            from h3fusion.evaluation.judges import load_judges

            self.judges = load_judges(self.profile)
        return self.judges

    def known(self) -> KnownAnswers:
        if self._known is None:
            self._known = known_answers(self.profile)
        return self._known

    def release(self) -> None:
        """Drop the bank (and what holds it), e.g. while dense merged models are evaluated."""
        self._bank = self._mixture = None
        self._token_logprobs.clear()
