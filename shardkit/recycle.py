"""Batch memory that stays mapped in the main process and that a worker writes again once the main
process says it is free.

A worker sends each batch to the main process in shared memory. Sent the ordinary way, every batch
is a new shared-memory file: the worker's page faults on first write (the kernel zeroes every page;
~19 ms for a 38 MB batch, four times the copy itself), then in the main process a round trip to the
worker's ``resource_sharer`` thread for the file descriptor (which waits for the worker's GIL while
it decodes), an ``mmap``, page faults again on first read, and an ``munmap`` when the batch is
dropped — all in the thread that runs the training step, between two steps.

With shardkit's loader (``make_loader``; on by default when memory is pinned), each worker keeps a
few batch buffers (:class:`BatchRing`, at most ``prefetch_factor + 3``), and the main process keeps
each of them mapped for the workers' life (:class:`MainRings`):

1. The first batch a buffer carries goes with the buffer itself (its file descriptor, once); every
   later one is a few numbers (:class:`RingBatch`: worker, slot, sequence number, shape and
   strides) that the main process turns into a tensor over the buffer it holds. No descriptor,
   no mapping, no page fault, no worker round trip.
2. A worker writes into a buffer again only when the main process has released the batch it sent
   in it: before it asks the DataLoader for the next item, the main process looks at each buffer
   it holds whose last batch it has not released yet, and releases it when nothing else refers
   to it (its storage's use count is its own: no tensor of the user's or of the pin-memory thread,
   no view of one). It writes that batch's sequence number into ``released``, one int64 per worker
   and slot in shared memory, which only the main process writes and only that worker reads.
3. In the worker, nothing else refers to the buffer either (the batch has been pickled and let go).

A batch arrives before it can be released (the main process releases only what it received), so a
buffer is never written while in flight. Anything else gets a fresh buffer, as without the ring.
What the use count cannot see is a batch the main process hands on to a third process and drops:
so the ring is used when the loader pins memory (the pin thread copies each batch; the user never
holds the shared one) or when the user asks for it (``make_loader(recycle_batches=True)``).
"""

from __future__ import annotations

import secrets
import weakref
from dataclasses import dataclass

import torch


def flat_tensor(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over ``storage`` (its own reference: what the use count counts)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def ring_slots(workers: int, wanted: int) -> int:
    """How many buffers each of ``workers`` may keep: ``wanted``, unless the file descriptors the
    main process may open cannot take them (each buffer kept mapped there holds one). The soft
    limit is raised towards the hard one first, as far as a quarter of it covers the buffers;
    fewer than 2 buffers a worker: 0, no recycling."""
    if workers <= 0:
        return 0
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    need = 4 * workers * wanted + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    slots = min(wanted, max(0, (soft - 256) // (4 * workers)))
    return slots if slots >= 2 else 0


# The main process's MainRings by token: a RingBatch being unpickled finds its buffers here.
_LIVE: "weakref.WeakValueDictionary[str, MainRings]" = weakref.WeakValueDictionary()


class MainRings:
    """The main process's side for one set of workers: the buffers they sent, kept mapped, and the
    shared ``released`` array (workers × slots) it writes."""

    def __init__(self, workers: int, slots: int):
        self.token = secrets.token_hex(8)
        self.released = torch.zeros(workers, slots, dtype=torch.int64).share_memory_()
        self._released = self.released.numpy()
        # (worker, slot) -> [storage, sequence number of the last batch received in it]
        self.buffers: dict[tuple[int, int], list] = {}
        _LIVE[self.token] = self

    def spec(self) -> "RecycleSpec":
        """What the workers started now need (they copy it with the dataset)."""
        return RecycleSpec(self.token, self.released)

    def receive(self, worker: int, slot: int, seq: int, storage, dtype, size, stride,
                offset) -> torch.Tensor:
        """The tensor of batch ``seq``, over the buffer of ``(worker, slot)`` (``storage``: sent
        with its first batch, kept from then on). Runs where the result is unpickled: the main
        thread or the pin-memory thread."""
        key = (worker, slot)
        entry: list | None
        if storage is not None:
            entry = self.buffers[key] = [storage, 0]
        else:
            entry = self.buffers.get(key)
            if entry is None:
                raise RuntimeError(f"shardkit: batch buffer {key} of a recycling loader arrived "
                                   "without its memory (was a worker's batch unpickled twice?)")
        tensor = torch.empty(0, dtype=dtype).set_(entry[0], offset, size, stride)
        entry[1] = seq  # after the tensor exists: release() never sees it unused in between
        return tensor

    def release(self) -> None:
        """Tell the workers which of their buffers nothing here uses any more."""
        released = self._released
        for (worker, slot), (storage, seq) in list(self.buffers.items()):
            if seq > released[worker, slot] and _use_count(storage) == 1:
                released[worker, slot] = seq


def _receive(token: str, worker: int, slot: int, seq: int, storage, dtype, size, stride,
             offset) -> torch.Tensor:
    rings = _LIVE.get(token)
    if rings is None:
        if storage is None:
            raise RuntimeError("shardkit: a recycled batch can only be unpickled by the loader "
                               "whose workers made it")
        return torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)
    return rings.receive(worker, slot, seq, storage, dtype, size, stride, offset)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class RingBatch(torch.Tensor):
    """A batch tensor in a worker's ring buffer. In the worker it is a tensor like any other;
    pickled for the main process it is the numbers that find its buffer there (plus the buffer
    itself the first time), and a plain tensor over that buffer once unpickled."""

    _ring_ref: tuple = ()

    def __reduce_ex__(self, protocol):
        if not self._ring_ref:  # derived in the worker (a collate_fn's .float(), a view): a
            # plain tensor (torch's own reduction); its slot stays unreleased, never rewritten
            return _plain, (self.as_subclass(torch.Tensor),)
        token, worker, slot, seq, first = self._ring_ref
        storage = self.untyped_storage() if first else None
        return _receive, (token, worker, slot, seq, storage, self.dtype, tuple(self.shape),
                          self.stride(), self.storage_offset())


@dataclass(frozen=True)
class RecycleSpec:
    """What shardkit's loader tells the workers it starts: the token of its :class:`MainRings`
    and the shared ``released`` array."""

    token: str
    released: torch.Tensor

    def ring(self, worker: int) -> "BatchRing":
        """The :class:`BatchRing` of DataLoader worker ``worker``."""
        return BatchRing(self.token, self.released, worker)


@dataclass
class _Slot:
    index: int
    storage: torch.UntypedStorage
    nbytes: int
    sent: int = 0  # sequence number of the last batch sent in it
    announced: bool = False  # the main process has (or will have) its memory


class BatchRing:
    """A worker's batch buffers (see the module docstring for when one is written again)."""

    def __init__(self, token: str, released: torch.Tensor, worker: int = 0):
        self.token, self.worker = token, int(worker)
        self.released = released  # [workers, slots] int64, written by the main process
        self.capacity = int(released.shape[1])
        self.slots: list[_Slot] = []  # one size: full batches; most recently used last
        self.seq = 0
        self._taken: _Slot | None = None
        self.reused = self.fresh = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """Shared memory for the next batch, as a flat uint8 tensor; :meth:`seal` the batch made
        in it before it leaves the worker."""
        slot = self._free(nbytes)
        if slot is not None:
            self.reused += 1
        else:
            self.fresh += 1
            storage = torch.UntypedStorage._new_shared(nbytes)
            # Kept: full batches only (the largest size seen). A worker's last, partial batch
            # would push out a buffer the next full batch needs.
            if self.slots and nbytes > self.slots[0].nbytes:
                self.slots.clear()  # the main process drops each as a new one takes its slot
            if len(self.slots) < self.capacity and (not self.slots
                                                    or nbytes == self.slots[0].nbytes):
                used = {s.index for s in self.slots}
                slot = _Slot(min(set(range(self.capacity)) - used), storage, nbytes)
                self.slots.append(slot)
        self._taken = slot
        return flat_tensor(storage if slot is None else slot.storage)

    def seal(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as it leaves the worker: a :class:`RingBatch` when it lies in the buffer
        :meth:`take` gave (else unchanged: the buffer was not used and stays free)."""
        slot, self._taken = self._taken, None
        if slot is None or images.untyped_storage().data_ptr() != slot.storage.data_ptr():
            return images
        self.seq += 1
        slot.sent = self.seq
        out = images.as_subclass(RingBatch)
        out._ring_ref = (self.token, self.worker, slot.index, self.seq, not slot.announced)
        slot.announced = True
        return out

    def _free(self, nbytes: int) -> _Slot | None:
        released = self.released[self.worker]
        for s in self.slots:
            if s.nbytes == nbytes and int(released[s.index]) >= s.sent \
                    and _use_count(s.storage) == 1:
                self.slots.remove(s)
                self.slots.append(s)
                return s
        return None
