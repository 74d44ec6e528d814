"""pipeline.errors: what the pipeline raises on purpose is a PipelineError; only config validation is also a
ValueError; the tuple a command line catches."""
import pytest

from saeforge.pipeline import errors
from saeforge.pipeline.errors import ConfigError, PipelineError


def test_every_deliberate_pipeline_error_is_a_pipeline_error_and_only_config_errors_are_value_errors():
    kinds = [errors.ConfigError, errors.DatasetError, errors.ModelLoadError, errors.HookError, errors.HarvestError,
             errors.EvalError, errors.ProvenanceError, errors.OutputError]
    assert all(issubclass(k, PipelineError) for k in kinds)
    assert [k for k in kinds if issubclass(k, ValueError)] == [errors.ConfigError]


def test_domain_errors_are_the_three_bases():
    from saeforge.stores.errors import StoreError
    from saeforge.trainer.errors import TrainerError

    assert errors.domain_errors() == (StoreError, TrainerError, PipelineError)


def test_config_dataclasses_raise_config_errors_naming_every_field():
    from saeforge.pipeline.evaluate import EvalConfig
    from saeforge.pipeline.harvest import HarvestConfig
    from saeforge.pipeline.windows import WindowRules

    with pytest.raises(ConfigError, match="tokens must be >= 1.*batch_size must be >= 1.*no hooks") as e:
        HarvestConfig(out="x", tokens=0, batch_size=0)
    assert [field for field, _ in e.value.problems] == ["tokens", "batch_size", None]  # a CLI names its options
    with pytest.raises(ConfigError, match="tokens must be >= 1.*strategy must be"):
        EvalConfig(tokens=0, strategy="fast")
    with pytest.raises(ConfigError, match="context_size must be >= 2"):
        WindowRules(context_size=1)
