import networkx as nx
import numpy as np
import pytest
import torch

from latticeflow import SquareLattice


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_periodic_counts_and_degree(L):
    lat = SquareLattice(L)
    assert lat.N == L * L
    assert lat.bonds.shape == (2 * L * L, 2)
    A = lat.adjacency()
    np.testing.assert_array_equal(A, A.T)
    np.testing.assert_array_equal(A.sum(1), 4.0)  # every site has 4 bonds, multiplicity counted
    assert lat.graph.number_of_edges() == 2 * L * L


def test_l2_double_bonds_warned():
    with pytest.warns(UserWarning, match="two bonds"):
        lat = SquareLattice(2)
    A = lat.adjacency()
    # site 0 = (0,0) is joined to (0,1) and (1,0) twice each, never to the diagonal (1,1)
    np.testing.assert_array_equal(A[0], [0, 2, 2, 0])


def test_site_index_and_neighbours():
    lat = SquareLattice(4)
    i = 1 * 4 + 3  # row 1, col 3
    assert lat.coords[i].tolist() == [1, 3]
    assert lat.neighbours[i].tolist() == [1 * 4 + 0, 2 * 4 + 3, 1 * 4 + 2, 0 * 4 + 3]


def test_matches_networkx_grid():
    for L, periodic in [(5, True), (4, False), (3, True)]:
        lat = SquareLattice(L, "periodic" if periodic else "open")
        ref = nx.grid_2d_graph(L, L, periodic=periodic)
        ref = nx.relabel_nodes(ref, {(r, c): r * L + c for r, c in ref.nodes})
        assert nx.is_isomorphic(nx.Graph(lat.graph), ref)
        assert set(map(frozenset, nx.Graph(lat.graph).edges())) == set(map(frozenset, ref.edges()))


def test_open_boundary():
    lat = SquareLattice(3, boundary="open")
    assert lat.bonds.shape == (2 * 3 * 2, 2)
    assert lat.neighbours[0].tolist() == [1, 3, -1, -1]
    with pytest.raises(ValueError, match="periodic"):
        lat.coupling_kernel()


def test_coupling_kernel_is_row_of_adjacency():
    for L in (2, 3, 5):
        lat = SquareLattice(L)
        np.testing.assert_array_equal(lat.coupling_kernel().reshape(-1).numpy(), lat.adjacency()[0])


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, "4", None, True])
def test_bad_L(bad):
    with pytest.raises(ValueError, match=r"L must be an integer >= 2, got L="):
        SquareLattice(bad)


def test_bad_boundary():
    with pytest.raises(ValueError, match="boundary must be one of 'periodic', 'open'; got boundary='twisted'"):
        SquareLattice(4, boundary="twisted")
