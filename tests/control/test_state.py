"""ClusterState: what each source sets, versions, and operator changes across
membership changes (pure, no sockets)."""

from __future__ import annotations

import pytest

from poise.control.state import ClusterState, ClusterView, Member

A = Member("127.0.0.1", 9001)
B = Member("127.0.0.1", 9002, weight=2)
C = Member("::1", 9003, backup=True, max_connections=5)


def test_the_first_view_is_version_1_with_every_member_up():
    state = ClusterState("app", [A, B])
    assert state.version == 1
    assert state.view.members == (A, B)
    assert not any(m.down or m.drained for m in state.view.members)


def test_a_change_makes_a_new_version_and_no_change_keeps_it():
    state = ClusterState("app", [A, B])
    view = state.view
    assert state.set_members([A, B]) is False
    assert state.view is view and state.version == 1
    assert state.set_down(A.key, True) is True
    assert state.version == 2 and state.member(A.key).down
    assert state.set_down(A.key, True) is False and state.version == 2
    assert state.set_members([A, B, C]) is True and state.version == 3


def test_down_and_drained_in_the_configured_members_are_ignored():
    state = ClusterState("app", [Member("h", 1, down=True, drained=True)])
    assert state.view.members == (Member("h", 1),)


def test_a_drain_survives_a_membership_change_while_the_backend_stays():
    state = ClusterState("app", [A, B])
    state.set_drained(A.key, True)
    state.set_members([A, B, C])
    assert state.member(A.key).drained
    state.set_drained(A.key, False)
    assert not state.member(A.key).drained


def test_a_removed_backend_is_forgotten_with_what_was_set_on_it():
    state = ClusterState("app", [A, B])
    state.set_drained(A.key, True)
    state.set_down(A.key, True)
    state.set_weight(A.key, 7)
    state.set_members([B])
    state.set_members([A, B])
    assert state.member(A.key) == A


def test_a_weight_override_survives_unless_the_file_changes_that_weight():
    state = ClusterState("app", [A, B])
    state.set_weight(B.key, 9)
    assert state.member(B.key).weight == 9 and state.weight_overridden(B.key)
    state.set_members([A, B, C])                  # B's configured weight unchanged
    assert state.member(B.key).weight == 9
    state.set_members([A, Member("127.0.0.1", 9002, weight=3)])   # edited in the file
    assert state.member(B.key).weight == 3 and not state.weight_overridden(B.key)


def test_setting_the_configured_weight_again_ends_the_override():
    state = ClusterState("app", [B])
    state.set_weight(B.key, 5)
    state.set_weight(B.key, 2)
    assert not state.weight_overridden(B.key)


def test_operator_changes_to_unknown_backends_raise_key_error():
    state = ClusterState("app", [A])
    with pytest.raises(KeyError):
        state.set_drained(("127.0.0.1", 1), True)
    with pytest.raises(KeyError):
        state.set_weight(("127.0.0.1", 1), 3)
    with pytest.raises(KeyError):
        state.member(("127.0.0.1", 1))


def test_a_check_verdict_for_a_backend_that_left_is_ignored():
    state = ClusterState("app", [A])
    assert state.set_down(("127.0.0.1", 1), True) is False
    assert state.version == 1


def test_two_members_with_one_address_are_refused():
    with pytest.raises(ValueError):
        ClusterState("app", [A, Member(A.host, A.port, weight=3)])


def test_views_round_trip_through_the_wire_format():
    state = ClusterState("app", [A, B, C])
    state.set_drained(C.key, True)
    state.set_down(B.key, True)
    view = state.view
    assert ClusterView.from_wire(view.to_wire()) == view
    assert C.address == "[::1]:9003"
