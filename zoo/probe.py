"""Frozen-feature evaluation: a linear probe and k-NN on encoder features.

Images: labelled digits, features = mean of the patch tokens. Text: held-out chunks of the
``pycode`` corpus labelled with their top-level stdlib package (the catch-all "other" class is
left out), features = mean of the backbone's hidden states over non-pad tokens (the encoder of
an encoder-decoder). The linear probe is an L2-regularised
multinomial logistic regression on standardised features (scikit-learn, L-BFGS); k-NN is a
cosine-similarity vote weighted by exp(sim / 0.07), as in DINO's ``eval_knn``.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from objectives.base import image_to_float, patchify

KNN_TEMPERATURE = 0.07


TEXT_CHUNKS_PER_DOCUMENT = 8   # so the largest files do not dominate the text probe


def encoder_features(encoder, images: np.ndarray, patch_size: int | None,
                     batch_size: int = 256) -> np.ndarray:
    """Features [N, width] for uint8 images [N, H, W, C] (or int tokens [N, L] when
    ``patch_size`` is None), computed in fixed-size batches."""
    graphdef, params = nnx.split(encoder)

    @jax.jit
    def features(params, images):
        model = nnx.merge(graphdef, params)
        if patch_size is None:
            return model.features(images)
        return model.features(patchify(image_to_float(images), patch_size))

    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk)  # pad the last chunk: one compiled shape
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(features(params, jnp.asarray(chunk)))[:batch_size - pad])
    return np.concatenate(out)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, c: float = 1.0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 20,
                 num_classes: int | None = None) -> float:
    """Weighted k-NN with cosine similarity (DINO-style vote)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = normalise(test_x) @ normalise(train_x).T
    k = min(k, len(train_x))
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, idx, axis=1)
    weights = np.exp(top_sims / KNN_TEMPERATURE)
    votes = np.zeros((len(test_x), num_classes))
    np.add.at(votes, (np.arange(len(test_x))[:, None], train_y[idx]), weights)
    return float((votes.argmax(axis=1) == test_y).mean())


def evaluate_encoder(encoder, patch_size: int, train: tuple[np.ndarray, np.ndarray],
                     test: tuple[np.ndarray, np.ndarray], *, knn_k: int = 20,
                     batch_size: int = 256) -> dict[str, float]:
    """Linear-probe and k-NN accuracy of a frozen encoder."""
    train_x = encoder_features(encoder, train[0], patch_size, batch_size)
    test_x = encoder_features(encoder, test[0], patch_size, batch_size)
    return {"linear_probe": linear_probe_accuracy(train_x, train[1], test_x, test[1]),
            "knn": knn_accuracy(train_x, train[1], test_x, test[1], k=knn_k)}


def probe(config, workdir: str | None = None) -> dict[str, float]:
    """Probes the encoder of ``workdir``'s latest checkpoint, or a random init if None.

    Single-host: features are computed from host arrays and fetched to this host.

    Example::

        zoo.probe(zoo.config.load("experiments/mae_digits.py:tiny"), "/tmp/mae")
        # {'linear_probe': 0.93, 'knn': 0.95, 'step': 200}
    """
    import zoo.data
    from zoo.train import attach_tokenizer, build, dataset_spec, restore_or_init

    experiment = build(config)
    objective, data_spec = experiment.objective, experiment.data_spec
    if objective.modality == "mixture":   # the encoder is the first component's backbone
        first = objective.components[0]
        objective, data_spec = first.objective, data_spec[first.data]
    if objective.modality == "pairs":
        raise ValueError(f"objective.name: {objective.name!r} is a two-tower objective; "
                         "evaluate it by retrieval (zoo.retrieval.retrieval_scores or zoo "
                         "compare --suite retrieval), not by a probe")
    dataset = probe_dataset(config, objective.modality)
    try:
        spec = dataset_spec(config, dataset)
    except ValueError as error:
        raise ValueError(f"probe.dataset: {str(error).removeprefix('data.name: ')}") from None
    if objective.modality == "image" and (tuple(spec.image_shape)
                                          != tuple(data_spec.image_shape)):
        raise ValueError(f"probe.dataset: {dataset!r} images are "
                         f"{spec.image_shape} but the encoder was built for "
                         f"{data_spec.image_shape}; pick a probe dataset of that shape")
    state, step = restore_or_init(experiment, workdir, purpose="probe")
    model = nnx.merge(experiment.graphdef, state.params)
    if objective.modality == "text":
        length = objective.model_lengths(config.data.seq_len)["encoder"]
        tokenizer = attach_tokenizer(experiment, workdir).tokenizer
        train, test = (text_probe_split(dataset, split, length, spec, config.data.data_dir,
                                        tokenizer=tokenizer)
                       for split in ("train", "test"))
        patch_size = None
    else:
        train = zoo.data.load_arrays(dataset, "train", data_dir=config.data.data_dir)
        test = zoo.data.load_arrays(dataset, "test", data_dir=config.data.data_dir)
        patch_size = config.model.patch_size
    with jax.set_mesh(experiment.mesh), nnx.logical_axis_rules(config.rules):
        scores = evaluate_encoder(model.encoder, patch_size, train, test,
                                  knn_k=config.probe.knn_k, batch_size=config.probe.batch_size)
    return {**scores, "step": int(step)}


def probe_dataset(config, modality: str) -> str:
    if config.probe.dataset != "auto":
        return config.probe.dataset
    return {"image": "digits", "text": "pycode"}[modality]


def text_probe_split(dataset: str, split: str, length: int, spec, data_dir, tokenizer=None):
    """Labelled token chunks of one split, without the catch-all "other" class."""
    import zoo.data
    tokens, labels = zoo.data.load_text_chunks(
        dataset, split, seq_len=length, data_dir=data_dir,
        chunks_per_document=TEXT_CHUNKS_PER_DOCUMENT, tokenizer=tokenizer)
    names = tuple(spec.class_names or ())
    if "other" in names:
        keep = labels != names.index("other")
        tokens, labels = tokens[keep], labels[keep]
    if not len(labels) or labels.min() < 0:
        raise ValueError(f"probe.dataset: {dataset!r} has no labelled {split} chunks")
    return tokens, labels


from zoo._callable_module import make_module_callable  # noqa: E402

make_module_callable(__name__, "probe")   # zoo.probe(...) after `import zoo.probe`
