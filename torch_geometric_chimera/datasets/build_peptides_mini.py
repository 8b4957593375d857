r"""Build ``peptides_mini.pt``, the small real-molecule dataset that ships with the package.

Random peptides (4 to 16 residues of the 20 standard amino acids) are built atom by atom with
RDKit from their sequence. Nodes are heavy atoms with 9 categorical features and edges are bonds
(both directions) with 3 categorical features, the same feature set as OGB's molecule graphs and
LRGB's peptides. The 4 regression targets are computed by RDKit from the molecular graph:

0. Crippen logP,
1. topological polar surface area / 100,
2. topological diameter (longest shortest bond path) / 10, a long-range target,
3. number of rotatable bonds / 10.

Run once (needs ``pip install rdkit``)::

    python -m torch_geometric_chimera.datasets.build_peptides_mini --num 2000
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


def build(num: int, seed: int):
    from rdkit import Chem
    from rdkit.Chem import Crippen, Descriptors, rdMolDescriptors

    featurize_atom, featurize_bond = featurizers(Chem)

    rng = random.Random(seed)
    xs, edge_indices, edge_attrs, ys, sequences = [], [], [], [], []
    while len(ys) < num:
        sequence = "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(4, 16)))
        mol = Chem.MolFromSequence(sequence)
        if mol is None:
            continue
        x = [featurize_atom(a) for a in mol.GetAtoms()]
        src, dst, attr = [], [], []
        for bond in mol.GetBonds():
            i, j, f = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), featurize_bond(bond)
            src += [i, j]
            dst += [j, i]
            attr += [f, f]
        diameter = int(Chem.GetDistanceMatrix(mol).max())
        ys.append([Crippen.MolLogP(mol), rdMolDescriptors.CalcTPSA(mol) / 100, diameter / 10,
                   Descriptors.NumRotatableBonds(mol) / 10])
        xs.append(torch.tensor(x, dtype=torch.uint8))
        edge_indices.append(torch.tensor([src, dst], dtype=torch.int16))
        edge_attrs.append(torch.tensor(attr, dtype=torch.uint8))
        sequences.append(sequence)
    return {
        "x": torch.cat(xs), "edge_index": torch.cat(edge_indices, 1), "edge_attr": torch.cat(edge_attrs),
        "y": torch.tensor(ys, dtype=torch.float32),
        "node_ptr": torch.tensor([0] + [len(x) for x in xs]).cumsum(0),
        "edge_ptr": torch.tensor([0] + [e.size(1) for e in edge_indices]).cumsum(0),
        "sequences": sequences,
        "targets": ["logP", "TPSA/100", "diameter/10", "rotatable_bonds/10"],
        "seed": seed,
    }


def main():
    parser = argparse.ArgumentParser(description="Build the shipped peptides_mini dataset with RDKit.")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data", "peptides_mini.pt"))
    args = parser.parse_args()
    data = build(args.num, args.seed)
    torch.save(data, args.out)
    print(f"{args.num} peptides, {data['x'].size(0)} atoms, {data['edge_index'].size(1)} directed bonds "
          f"-> {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
