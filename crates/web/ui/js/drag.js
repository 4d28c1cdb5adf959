// Dragging a VM card onto a host, with pointer events (mouse, pen, touch): the card
// follows the pointer as a ghost, the host under it lights up, and letting go over
// another host calls `onDrop(vm, host)`. A press that does not move is a click (it
// selects the card, the keyboard's way to move a VM).

const THRESHOLD = 5;

/** Makes the cards under `board` draggable onto its host columns. */
export function enableDrag(board, { onDrop, onClick, onDragChange }) {
  let drag = null;

  board.addEventListener('pointerdown', (e) => {
    const card = e.target.closest('.vm[data-vm]');
    if (!card || e.button !== 0 || e.target.closest('button, a, input, select')) return;
    drag = { card, vm: card.dataset.vm, x: e.clientX, y: e.clientY, id: e.pointerId, ghost: null, over: null };
    card.setPointerCapture(e.pointerId);
  });

  board.addEventListener('pointermove', (e) => {
    if (!drag || e.pointerId !== drag.id) return;
    if (!drag.ghost) {
      if (Math.hypot(e.clientX - drag.x, e.clientY - drag.y) < THRESHOLD) return;
      drag.ghost = drag.card.cloneNode(true);
      drag.ghost.classList.add('ghost');
      drag.ghost.removeAttribute('data-vm');
      drag.ghost.style.width = `${drag.card.offsetWidth}px`;
      document.body.append(drag.ghost);
      drag.card.classList.add('dragging');
      onDragChange(true);
    }
    drag.ghost.style.left = `${e.clientX + 8}px`;
    drag.ghost.style.top = `${e.clientY + 8}px`;
    const over = hostAt(e.clientX, e.clientY);
    if (over !== drag.over) {
      drag.over?.classList.remove('drop-target');
      over?.classList.add('drop-target');
      drag.over = over;
    }
  });

  const end = (e, dropped) => {
    if (!drag || e.pointerId !== drag.id) return;
    const d = drag;
    drag = null;
    if (d.card.hasPointerCapture(e.pointerId)) d.card.releasePointerCapture(e.pointerId);
    if (!d.ghost) {
      if (dropped) onClick(d.vm);
      return;
    }
    d.ghost.remove();
    d.card.classList.remove('dragging');
    d.over?.classList.remove('drop-target');
    onDragChange(false);
    const host = dropped ? hostAt(e.clientX, e.clientY)?.dataset.host : null;
    if (host && host !== d.card.closest('[data-host]')?.dataset.host) onDrop(d.vm, host);
  };
  board.addEventListener('pointerup', (e) => end(e, true));
  board.addEventListener('pointercancel', (e) => end(e, false));
}

function hostAt(x, y) {
  return document.elementFromPoint(x, y)?.closest('.host[data-host]') ?? null;
}
