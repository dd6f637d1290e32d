"""The report's feature classifier: the function it computes, written out layer by layer."""
import torch
import torch.nn.functional as F

from core.models.classifier import FeatureClassifier


def reference_forward(model: FeatureClassifier, x: torch.Tensor) -> torch.Tensor:
    """Each block as the textbook writes it: convolution, batch norm, ReLU, then max pooling to 4x4 at the end."""
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.body if isinstance(m, torch.nn.BatchNorm2d)]
    linear = next(m for m in model.body if isinstance(m, torch.nn.Linear))
    for i, (conv, norm) in enumerate(zip(convs, norms)):
        x = F.relu(F.batch_norm(conv(x), None, None, norm.weight, norm.bias, training=True, eps=norm.eps))
        x = F.max_pool2d(x, 2) if i < 2 else F.adaptive_max_pool2d(x, 4)
    return model.head(F.relu(linear(x.flatten(1))))


def test_pooling_before_relu_gives_the_textbook_outputs_and_gradients():
    torch.manual_seed(0)
    model = FeatureClassifier(3, 5, width=4, features=16).train()
    x = torch.randn(6, 3, 20, 20)
    ours, reference = model(x), reference_forward(model, x)
    assert torch.allclose(ours, reference, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), list(model.parameters())) for out in (ours, reference)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_parameter_names_of_saved_classifiers_still_load():
    names = set(FeatureClassifier(1, 10).state_dict())
    assert {"body.0.weight", "body.1.running_mean", "body.4.weight", "body.8.weight", "body.13.weight",
            "head.weight"} <= names
