r"""Build ``peptides_mini.pt``, the small real-molecule dataset that ships with the package.

Random peptides (4 to 16 residues of the 20 standard amino acids) are built atom by atom with
RDKit from their sequence. Nodes are heavy atoms with 9 categorical features and edges are bonds
(both directions) with 3 categorical features, the same feature set as OGB's molecule graphs and
LRGB's peptides. The targets are structural, computed the way peptides-struct's were: RDKit
embeds one 3D conformer per molecule (ETKDGv3 with hydrogens, fixed seed), and on its heavy atoms:

0-2. principal moments of inertia, mass-weighted (ascending),
3-5. principal moments of inertia, weighted by each atom's total valence (ascending),
6-8. extent of the molecule along its three principal axes (descending),
9.   spherocity index,
10.  plane-of-best-fit distance.

Every target is then standardized over the whole set (zero mean, unit variance), as in
peptides-struct; the means and standard deviations are stored next to them. Molecules whose
embedding fails are redrawn. Run once (needs ``pip install rdkit``; about 1 s per molecule and
core)::

    python -m torch_geometric_chimera.datasets.build_peptides_mini --num 2000 --workers 2
"""
import argparse
import os
import random

import torch

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
ATOMIC_NUMBERS = list(range(1, 119))


def _index(value, options):
    """Position of ``value`` in ``options``; unknown values share the last slot."""
    return options.index(value) if value in options else len(options) - 1


def atom_features(atom, Chem):
    chirality = [Chem.ChiralType.CHI_UNSPECIFIED, Chem.ChiralType.CHI_TETRAHEDRAL_CW,
                 Chem.ChiralType.CHI_TETRAHEDRAL_CCW, Chem.ChiralType.CHI_OTHER]
    hybridization = [Chem.HybridizationType.SP, Chem.HybridizationType.SP2, Chem.HybridizationType.SP3,
                     Chem.HybridizationType.SP3D, Chem.HybridizationType.SP3D2, "other"]
    return [
        _index(atom.GetAtomicNum(), ATOMIC_NUMBERS + ["other"]),
        _index(atom.GetChiralTag(), chirality),
        _index(atom.GetTotalDegree(), list(range(11)) + ["other"]),
        _index(atom.GetFormalCharge(), list(range(-5, 6)) + ["other"]),
        _index(atom.GetTotalNumHs(), list(range(9)) + ["other"]),
        _index(atom.GetNumRadicalElectrons(), list(range(5)) + ["other"]),
        _index(atom.GetHybridization(), hybridization),
        int(atom.GetIsAromatic()),
        int(atom.IsInRing()),
    ]


def bond_features(bond, Chem):
    types = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC, "other"]
    stereo = [Chem.BondStereo.STEREONONE, Chem.BondStereo.STEREOZ, Chem.BondStereo.STEREOE,
              Chem.BondStereo.STEREOCIS, Chem.BondStereo.STEREOTRANS, Chem.BondStereo.STEREOANY]
    return [_index(bond.GetBondType(), types), _index(bond.GetStereo(), stereo), int(bond.GetIsConjugated())]


def featurizers(Chem):
    """OGB's own atom and bond featurization when ogb is installed, else the same features here."""
    try:
        from ogb.utils.features import atom_to_feature_vector, bond_to_feature_vector
        return atom_to_feature_vector, bond_to_feature_vector
    except ImportError:
        return (lambda atom: atom_features(atom, Chem)), (lambda bond: bond_features(bond, Chem))


TARGETS = ["inertia_mass_a", "inertia_mass_b", "inertia_mass_c",
           "inertia_valence_a", "inertia_valence_b", "inertia_valence_c",
           "length_a", "length_b", "length_c", "spherocity", "plane_best_fit"]


def principal_axes(coords: torch.Tensor, weights: torch.Tensor):
    """Principal moments of inertia (ascending) and axes of weighted points, in float64."""
    centered = coords - (weights[:, None] * coords).sum(0) / weights.sum()
    squared = (centered ** 2).sum(1)
    inertia = (weights * squared).sum() * torch.eye(3, dtype=coords.dtype) \
        - torch.einsum("n,ni,nj->ij", weights, centered, centered)
    moments, axes = torch.linalg.eigh(inertia)
    return moments, axes, centered


def structural_targets(sequence: str, seed: int):
    """The 11 structural targets of one peptide from an RDKit 3D conformer, or None if embedding fails."""
    from rdkit import Chem
    from rdkit.Chem import AllChem, Descriptors3D, rdMolDescriptors

    mol = Chem.AddHs(Chem.MolFromSequence(sequence))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True  # ETKDG's fallback for large flexible molecules
        if AllChem.EmbedMolecule(mol, params) != 0:
            return None
    mol = Chem.RemoveHs(mol)
    coords = torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float64)
    mass = torch.tensor([a.GetMass() for a in mol.GetAtoms()], dtype=torch.float64)
    valence = torch.tensor([a.GetTotalValence() for a in mol.GetAtoms()], dtype=torch.float64)
    mass_moments, axes, centered = principal_axes(coords, mass)
    valence_moments, _, _ = principal_axes(coords, valence)
    projected = centered @ axes
    lengths = (projected.max(0).values - projected.min(0).values).sort(descending=True).values
    return (mass_moments.tolist() + valence_moments.tolist() + lengths.tolist()
            + [Descriptors3D.SpherocityIndex(mol), rdMolDescriptors.CalcPBF(mol)])


def _sequences(num: int, seed: int):
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(4, 16))) for _ in range(num)]


def build(num: int, seed: int, workers: int = 1):
    from multiprocessing import Pool

    from rdkit import Chem

    featurize_atom, featurize_bond = featurizers(Chem)

    xs, edge_indices, edge_attrs, ys, sequences = [], [], [], [], []
    draws = 0
    with Pool(workers) as pool:
        while len(ys) < num:
            # Draw a few extra sequences per round; failed embeddings are simply redrawn.
            batch = _sequences(num - len(ys) + max(2, num // 250), seed + 7919 * draws)
            draws += 1
            targets = pool.starmap(structural_targets, [(s, seed) for s in batch], chunksize=4)
            for sequence, target in zip(batch, targets):
                if target is None or len(ys) == num:
                    continue
                mol = Chem.MolFromSequence(sequence)
                x = [featurize_atom(a) for a in mol.GetAtoms()]
                src, dst, attr = [], [], []
                for bond in mol.GetBonds():
                    i, j, f = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), featurize_bond(bond)
                    src += [i, j]
                    dst += [j, i]
                    attr += [f, f]
                ys.append(target)
                xs.append(torch.tensor(x, dtype=torch.uint8))
                edge_indices.append(torch.tensor([src, dst], dtype=torch.int16))
                edge_attrs.append(torch.tensor(attr, dtype=torch.uint8))
                sequences.append(sequence)
    y = torch.tensor(ys, dtype=torch.float64)
    mean, std = y.mean(0), y.std(0)
    return {
        "x": torch.cat(xs), "edge_index": torch.cat(edge_indices, 1), "edge_attr": torch.cat(edge_attrs),
        "y": ((y - mean) / std).float(), "target_mean": mean, "target_std": std,
        "node_ptr": torch.tensor([0] + [len(x) for x in xs]).cumsum(0),
        "edge_ptr": torch.tensor([0] + [e.size(1) for e in edge_indices]).cumsum(0),
        "sequences": sequences,
        "targets": TARGETS,
        "seed": seed,
    }


def main():
    parser = argparse.ArgumentParser(description="Build the shipped peptides_mini dataset with RDKit.")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "peptides_mini.pt"))
    args = parser.parse_args()
    data = build(args.num, args.seed, args.workers)
    torch.save(data, args.out)
    print(f"{args.num} peptides, {data['x'].size(0)} atoms, {data['edge_index'].size(1)} directed bonds "
          f"-> {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
