"""The built-in vhost-user-blk front-end (inspector/vhost_user/blk_frontend.py)
against a real back-end that is not ours: qemu-storage-daemon's
vhost-user-blk export (libvhost-user), on a tmpfs image."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from inspector.errors import InspectorError
from inspector.spec.virtio import (VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
                                   VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                   VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_RING_F_EVENT_IDX, has_feature)
from inspector.vhost_user.blk_frontend import BlkFrontend
from tests.conftest import require
from tests.support.qsd import QSD, running_qsd

IMAGE_SIZE = 8 << 20


@pytest.fixture
def qsd(tmp_path):
    require(QSD is not None, "qemu-storage-daemon is not installed (Debian qemu-system-common)")
    d = _shm_dir()
    img, sock = os.path.join(d, "img"), os.path.join(d, "vu.sock")
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    try:
        with running_qsd(img, sock):
            yield img, sock
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _shm_dir() -> str:
    """A tmpfs directory (the image in RAM), removed by the fixture's caller."""
    return tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, prefix="vqs-blk-")


def test_config_and_features_from_a_real_back_end(qsd):
    img, sock = qsd
    with BlkFrontend(sock) as fe:
        cfg = fe.config()
        assert cfg["capacity"] == IMAGE_SIZE // VIRTIO_BLK_SECTOR_SIZE
        assert cfg["blk_size"] == 512 and cfg["num_queues"] == 1
        assert has_feature(fe.features, VIRTIO_RING_F_EVENT_IDX)


def test_write_read_flush_get_id_unsupported(qsd):
    img, sock = qsd
    with BlkFrontend(sock) as fe:
        data = os.urandom(8192)
        c = fe.request(0, VIRTIO_BLK_T_OUT, 16, data)
        assert (c.status, c.type_name) == (VIRTIO_BLK_S_OK, "out")
        c = fe.request(0, VIRTIO_BLK_T_IN, 16, in_len=8192)
        assert c.status == VIRTIO_BLK_S_OK and c.data == data and c.used_len == 8193
        assert fe.request(0, VIRTIO_BLK_T_FLUSH).status == VIRTIO_BLK_S_OK
        c = fe.request(0, VIRTIO_BLK_T_GET_ID, in_len=VIRTIO_BLK_ID_BYTES)
        assert c.status == VIRTIO_BLK_S_OK and c.data
        assert fe.request(0, 99).status == VIRTIO_BLK_S_UNSUPP
    with open(img, "rb") as f:
        f.seek(16 * 512)
        assert f.read(8192) == data


def test_many_requests_in_flight_each_completed_once(qsd):
    img, sock = qsd
    with BlkFrontend(sock, queue_size=64) as fe:
        heads = [fe.submit(0, VIRTIO_BLK_T_IN, 8 * i, in_len=4096) for i in range(21)]  # 3 descriptors each
        with pytest.raises(InspectorError, match="1 free of 64"):
            fe.submit(0, VIRTIO_BLK_T_IN, 0, in_len=512)
        assert sorted(fe.in_flight(0)) == sorted(heads)
        done = fe.complete(0, timeout=5, want=21)
        assert sorted(c.head for c in done) == sorted(heads)
        assert {c.status for c in done} == {VIRTIO_BLK_S_OK}
        assert fe.in_flight(0) == []


def test_raw_chain_and_limits(qsd):
    img, sock = qsd
    with BlkFrontend(sock, max_data=4096) as fe:
        with pytest.raises(InspectorError, match="max_data"):
            fe.submit(0, VIRTIO_BLK_T_OUT, 0, bytes(8192))
        # A well-formed request built by hand: header, data, status.
        head = fe.submit_chain(0, [(bytes(16), False), (bytes(512), False), (1, True)])
        c = fe.wait_head(0, head)
        assert c.status == VIRTIO_BLK_S_OK and c.type is None
