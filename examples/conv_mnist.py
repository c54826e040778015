"""A convolutional encoder and decoder of your own on MNIST, through ``iwae.fit``, then the
test NLL with L_5000 and log p(x) by AIS.

    python examples/conv_mnist.py --data-dir DATA --out runs/conv-mnist            # 3 stages
    python examples/conv_mnist.py --data-dir DATA --out runs/conv-mnist --stages 8  # the paper's

Running it again continues the run from its checkpoint (or, finished, only evaluates).
"""

import argparse

import torch
from torch import nn

import iwae


class Encoder(nn.Module):
    """x [N, 784] -> the mean and log sigma [N, latent] of q(h | x): two strided convolutions."""

    def __init__(self, latent: int = 50, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),  # 14x14
            nn.Tanh(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),  # 7x7
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 2 * latent),
        )

    def forward(self, x):
        return self.net(x.view(-1, 1, 28, 28)).chunk(2, -1)


class Decoder(nn.Module):
    """h [N, latent] -> Bernoulli logits [N, 784]: two transposed convolutions."""

    def __init__(self, latent: int = 50, width: int = 32):
        super().__init__()
        self.width = width
        self.inp = nn.Sequential(nn.Linear(latent, 2 * width * 7 * 7), nn.Tanh())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # 14x14
            nn.Tanh(),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),  # 28x28
        )

    def forward(self, h):
        return self.net(self.inp(h).view(-1, 2 * self.width, 7, 7)).flatten(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="directory holding mnist/")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stages", type=int, default=3, help="stages of Burda et al.'s schedule")
    p.add_argument("-k", type=int, default=5, help="IWAE samples in training")
    p.add_argument("--n-train", type=int, help="train on the first N images only")
    p.add_argument("--n-test", type=int, help="evaluate on a seeded random subset of N")
    p.add_argument("--eval-k", type=int, default=5000, help="samples of the test NLL")
    p.add_argument("--ais-steps", type=int, default=1000, help="AIS intermediate distributions")
    p.add_argument("--ais-n", type=int, default=100, help="test images for AIS")
    p.add_argument(
        "--stage-nll-k",
        type=int,
        default=5000,
        help="samples of the test NLL logged at every stage end (0: off)",
    )
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = iwae.ModuleVAE(Encoder(), Decoder(), latent=50)
    summary = iwae.fit(
        model,
        "iwae",
        "mnist",
        out=args.out,
        k=args.k,
        schedule=args.stages,
        n_train=args.n_train,
        data_dir=args.data_dir,
        stage_nll_k=args.stage_nll_k,
    )
    print(f"trained {summary['passes']} passes in {summary['train_seconds']:.0f} s")
    result = iwae.evaluate_model(
        model, "mnist", k=args.eval_k, n_test=args.n_test, data_dir=args.data_dir, progress=True
    )
    print(
        f"test NLL (L_{args.eval_k}, {result['n_test']} images): {result['nll']:.2f} "
        f"+- {result['nll_stderr']:.2f} nats"
    )
    ais = iwae.run_ais(
        model,
        "mnist",
        steps=args.ais_steps,
        n_test=args.ais_n,
        k=args.eval_k,
        data_dir=args.data_dir,
        progress=True,
    )
    print(
        f"log p(x) by AIS ({args.ais_steps} steps, {ais['n_test']} images): "
        f"{ais['log_px_ais']:.2f}; L_{args.eval_k} on them {ais['log_px_iwae']:.2f}"
    )


if __name__ == "__main__":
    main()
