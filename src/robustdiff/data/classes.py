"""Class names of the datasets, in label order (for figures: sample grids, adversarial examples)."""

from __future__ import annotations

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashionmnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "svhn": tuple(str(d) for d in range(10)),  # label k is the digit k (SVHN's "10" for 0 is remapped on load)
}


def class_names(dataset: str | None, num_classes: int) -> list[str]:
    """The names of ``dataset``'s classes; "class <k>" where none are listed (CIFAR-100, TinyImageNet)."""
    names = CLASS_NAMES.get(str(dataset).lower())
    if names is not None and len(names) == num_classes:
        return list(names)
    return [f"class {k}" for k in range(num_classes)]
