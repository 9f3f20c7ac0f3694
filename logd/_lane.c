/*
 * logd._hot, part two: a connection's MSG lane, in C (built into logd._hot).
 *
 * The fan-in case (many connections, each sending one MSG and waiting for
 * its OK) cost a dozen Python calls per message when the connection's Python
 * code carried it: the asyncio adapter, the session, the append queue and
 * back. Here it costs none. `Lane` is the base class of
 * logd.connection.Connection: its data_received takes a chunk that is
 * nothing but whole MSG commands straight to the append queue, as long as
 * the connection's Python code has said (``lane_open``) that nothing else is
 * going on there (no reply of the session pending or queued, no command
 * waiting, no stream, nothing held by the parser or the budgets) and the
 * server-wide `Hub` says MSGs are accepted and no budget is exceeded.
 * Anything else goes to the Python path, the connection's ``slow_received``.
 *
 * The lane's MSGs are ahead of every reply the session holds (the session
 * sends nothing while ``fast_count`` is above 0), so their ``OK <id>`` lines
 * are written the moment their round is committed (`ack_round`): all of one
 * connection's in one write, as a pipelining client sends them.
 *
 * The pure-Python twin is logd/lane.py, and it is the reference:
 * tests/test_hot_lane.py holds the two to each other.
 */
#include "_hot.h"

#include <structmember.h>

static PyObject *str_slow_received, *str_flush, *str_lane_ack, *str_lane_send, *str_batch_done;

/* --- Hub: the server-wide state the lane reads ------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *append; /* called with each batch tuple: the append queue's pending deque's append */
    PyObject *kick;   /* called with no round armed, or past the backlog: the queue's _kick */
    Py_ssize_t pending_bytes;
    Py_ssize_t backlog_bytes;
    Py_ssize_t conn_input;
    char accepting; /* MSGs are accepted now (leader, no fail-stop, no --min-replicas) */
    char over;      /* over a server-wide memory budget */
    char armed;     /* a round will take what is pending (scheduled, or after the running fsync) */
} Hub;

static int
hub_init(Hub *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"append", "kick", "backlog_bytes", "conn_input", NULL};
    PyObject *append, *kick;
    Py_ssize_t backlog_bytes, conn_input;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnn", kwlist, &append, &kick, &backlog_bytes, &conn_input))
        return -1;
    if (!PyCallable_Check(append) || !PyCallable_Check(kick)) {
        PyErr_SetString(PyExc_TypeError, "Hub(append, kick, ...): append and kick must be callable");
        return -1;
    }
    Py_XSETREF(self->append, Py_NewRef(append));
    Py_XSETREF(self->kick, Py_NewRef(kick));
    self->backlog_bytes = backlog_bytes;
    self->conn_input = conn_input;
    self->pending_bytes = 0;
    self->accepting = 1;
    self->over = 0;
    self->armed = 0;
    return 0;
}

static int
hub_traverse(Hub *self, visitproc visit, void *arg)
{
    Py_VISIT(self->append);
    Py_VISIT(self->kick);
    return 0;
}

static int
hub_clear(Hub *self)
{
    Py_CLEAR(self->append);
    Py_CLEAR(self->kick);
    return 0;
}

static void
hub_dealloc(Hub *self)
{
    PyObject_GC_UnTrack(self);
    hub_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef hub_members[] = {
    {"pending_bytes", T_PYSSIZET, offsetof(Hub, pending_bytes), 0, "MSG body bytes in the queue, not yet written"},
    {"backlog_bytes", T_PYSSIZET, offsetof(Hub, backlog_bytes), 0, "past this, every batch calls kick"},
    {"conn_input", T_PYSSIZET, offsetof(Hub, conn_input), 0, "a lane past this calls its flush"},
    {"accepting", T_BOOL, offsetof(Hub, accepting), 0, "MSGs are accepted now"},
    {"over", T_BOOL, offsetof(Hub, over), 0, "over a server-wide budget: the lane is shut"},
    {"armed", T_BOOL, offsetof(Hub, armed), 0, "a round will take what is pending"},
    {NULL},
};

static PyTypeObject HubType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logd._hot.Hub",
    .tp_doc = PyDoc_STR("Hub(append, kick, backlog_bytes, conn_input): what every Lane of a server shares."),
    .tp_basicsize = sizeof(Hub),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)hub_init,
    .tp_traverse = (traverseproc)hub_traverse,
    .tp_clear = (inquiry)hub_clear,
    .tp_dealloc = (destructor)hub_dealloc,
    .tp_members = hub_members,
};

/* --- Lane: one connection's MSG lane ---------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *hub;         /* a Hub, or NULL before lane_setup */
    PyObject *write;       /* transport.write; NULL or None: write nothing */
    PyObject *buffer_size; /* transport.get_write_buffer_size */
    Py_ssize_t max_line;
    long long max_message, max_batch, max_batch_bytes;
    Py_ssize_t fast_count; /* the lane's MSGs whose OK is not yet written */
    Py_ssize_t fast_bytes; /* their body bytes */
    Py_ssize_t unsent;     /* output bytes counted in the server's budget (budgets.py) */
    char *acks;            /* OK lines of committed MSGs, until lane_send writes them */
    Py_ssize_t acks_len, acks_cap;
    Py_ssize_t acks_count, acks_bytes; /* the MSGs they answer, and their body bytes */
    char open;             /* set by the connection's Python code: the lane may take input */
    char active;           /* data arrived since the idle sweeper last looked */
} Lane;

static PyTypeObject LaneType;

static int
lane_traverse(Lane *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hub);
    Py_VISIT(self->write);
    Py_VISIT(self->buffer_size);
    return 0;
}

static int
lane_clear(Lane *self)
{
    Py_CLEAR(self->hub);
    Py_CLEAR(self->write);
    Py_CLEAR(self->buffer_size);
    return 0;
}

static void
lane_dealloc(Lane *self)
{
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    PyMem_Free(self->acks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int
can_write(PyObject *write)
{
    return write != NULL && write != Py_None;
}

static PyObject *
lane_setup(Lane *self, PyObject *args)
{
    PyObject *hub;
    Py_ssize_t max_line;
    long long max_message, max_batch, max_batch_bytes;
    if (!PyArg_ParseTuple(args, "O!nLLL", &HubType, &hub, &max_line, &max_message, &max_batch, &max_batch_bytes))
        return NULL;
    if (max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "max_line out of range");
        return NULL;
    }
    Py_XSETREF(self->hub, Py_NewRef(hub));
    self->max_line = max_line;
    self->max_message = max_message;
    self->max_batch = max_batch;
    self->max_batch_bytes = max_batch_bytes;
    Py_RETURN_NONE;
}

/* Hand each MSG (a list of bodies) of ``batches`` to the append queue as the
 * tuple (bodies, nbytes, lane, None); 0, or -1 with an exception set. */
static int
lane_submit(Lane *self, Hub *hub, PyObject *batches)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batches); i++) {
        PyObject *bodies = PyList_GET_ITEM(batches, i);
        Py_ssize_t nbytes = 0;
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(bodies); j++)
            nbytes += PyBytes_GET_SIZE(PyList_GET_ITEM(bodies, j));
        PyObject *size = PyLong_FromSsize_t(nbytes);
        if (size == NULL)
            return -1;
        PyObject *batch = PyTuple_Pack(4, bodies, size, (PyObject *)self, Py_None);
        Py_DECREF(size);
        if (batch == NULL)
            return -1;
        PyObject *r = PyObject_CallOneArg(hub->append, batch);
        Py_DECREF(batch);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        self->fast_count++;
        self->fast_bytes += nbytes;
        hub->pending_bytes += nbytes;
    }
    if (!hub->armed || hub->pending_bytes > hub->backlog_bytes) {
        PyObject *r = PyObject_CallNoArgs(hub->kick);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    if (self->fast_bytes > hub->conn_input) { /* the connection's flush pauses reading */
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_flush);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

static PyObject *
lane_data_received(Lane *self, PyObject *data)
{
    self->active = 1;
    Hub *hub = (Hub *)self->hub;
    /* hub->append is NULL only for a Hub never initialised (Hub.__new__ alone): no lane then. */
    if (self->open && hub != NULL && hub->append != NULL && hub->accepting && !hub->over && can_write(self->write)
        && PyBytes_CheckExact(data) && PyBytes_GET_SIZE(data) > 0) {
        PyObject *batches = PyList_New(0);
        if (batches == NULL)
            return NULL;
        Py_ssize_t size = PyBytes_GET_SIZE(data);
        Py_ssize_t end = take_msg_run(PyBytes_AS_STRING(data), size, 0, self->max_line, self->max_message,
                                      self->max_batch, self->max_batch_bytes, batches);
        if (end == size && PyList_GET_SIZE(batches) > 0) {
            Py_INCREF(hub); /* kick and flush run Python */
            int rc = lane_submit(self, hub, batches);
            Py_DECREF(hub);
            Py_DECREF(batches);
            if (rc < 0)
                return NULL;
            Py_RETURN_NONE;
        }
        Py_DECREF(batches);
        if (end < 0)
            return NULL;
    }
    return PyObject_CallMethodOneArg((PyObject *)self, str_slow_received, data);
}

/* One of the lane's MSGs is committed, its last message with ``last_id``:
 * add its OK line to those lane_send writes. 0, or -1 with MemoryError. */
static int
lane_ack(Lane *self, Py_ssize_t nbytes, long long last_id)
{
    if (self->acks_cap - self->acks_len < 32) {
        Py_ssize_t cap = self->acks_cap ? self->acks_cap * 2 : 256;
        char *grown = PyMem_Realloc(self->acks, (size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->acks = grown;
        self->acks_cap = cap;
    }
    self->acks_len += snprintf(self->acks + self->acks_len, 32, "OK %lld\r\n", last_id);
    self->acks_count++;
    self->acks_bytes += nbytes;
    return 0;
}

/* Write the OK lines lane_ack gathered, in one write. 1: the connection's
 * flush must run (the lane is shut, or the transport now holds back output
 * the budget does not know of); 0: not; -1 with an exception set. */
static int
lane_send(Lane *self)
{
    Py_ssize_t len = self->acks_len;
    self->fast_count -= self->acks_count;
    self->fast_bytes -= self->acks_bytes;
    self->acks_len = self->acks_count = self->acks_bytes = 0;
    PyObject *write = self->write;
    if (len == 0 || !can_write(write))
        return 0; /* closed or lost: nobody to tell */
    PyObject *reply = PyBytes_FromStringAndSize(self->acks, len);
    if (reply == NULL)
        return -1;
    Py_INCREF(write);
    PyObject *r = PyObject_CallOneArg(write, reply); /* may call pause_writing, which shuts the lane */
    Py_DECREF(write);
    Py_DECREF(reply);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    if (!self->open || self->buffer_size == NULL || self->buffer_size == Py_None)
        return 1;
    PyObject *size = PyObject_CallNoArgs(self->buffer_size);
    if (size == NULL)
        return -1;
    Py_ssize_t unsent = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    if (unsent == -1 && PyErr_Occurred())
        return -1;
    return unsent != self->unsent;
}

static PyObject *
lane_ack_method(Lane *self, PyObject *args)
{
    Py_ssize_t nbytes;
    long long last_id;
    if (!PyArg_ParseTuple(args, "nL", &nbytes, &last_id))
        return NULL;
    if (lane_ack(self, nbytes, last_id) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
lane_send_method(Lane *self, PyObject *unused)
{
    int rc = lane_send(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyMethodDef lane_methods[] = {
    {"data_received", (PyCFunction)lane_data_received, METH_O,
     "asyncio.Protocol.data_received: whole MSGs straight to the queue while the lane is open; "
     "anything else to slow_received."},
    {"lane_setup", (PyCFunction)lane_setup, METH_VARARGS,
     "lane_setup(hub, max_line, max_message, max_batch, max_batch_bytes): the server's Hub and the parser's limits."},
    {"lane_ack", (PyCFunction)lane_ack_method, METH_VARARGS,
     "lane_ack(nbytes, last_id): one of the lane's MSGs is committed; its OK goes with the next lane_send."},
    {"lane_send", (PyCFunction)lane_send_method, METH_NOARGS,
     "lane_send() -> bool: write the OKs lane_ack gathered, in one write; True: call flush."},
    {NULL},
};

static PyMemberDef lane_members[] = {
    {"hub", T_OBJECT, offsetof(Lane, hub), READONLY, "the server's Hub (set by lane_setup)"},
    {"lane_write", T_OBJECT, offsetof(Lane, write), 0, "transport.write, or None: write nothing"},
    {"lane_buffer_size", T_OBJECT, offsetof(Lane, buffer_size), 0, "transport.get_write_buffer_size"},
    {"fast_count", T_PYSSIZET, offsetof(Lane, fast_count), 0, "the lane's MSGs whose OK is not yet written"},
    {"fast_bytes", T_PYSSIZET, offsetof(Lane, fast_bytes), 0, "their body bytes"},
    {"unsent", T_PYSSIZET, offsetof(Lane, unsent), 0, "output bytes counted in the server's budget"},
    {"lane_open", T_BOOL, offsetof(Lane, open), 0, "the lane may take input"},
    {"active", T_BOOL, offsetof(Lane, active), 0, "data arrived since the idle sweeper last looked"},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logd._hot.Lane",
    .tp_doc = PyDoc_STR("A connection's MSG lane: the base class of logd.connection.Connection."),
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_methods = lane_methods,
    .tp_members = lane_members,
};

/* --- the append queue's round ---------------------------------------------------------- */

/* Check that ``round_`` is a list of (bodies: list, nbytes: int, who, token) tuples. */
static int
check_round(PyObject *round_)
{
    if (!PyList_CheckExact(round_)) {
        PyErr_SetString(PyExc_TypeError, "a round is a list");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(round_); i++) {
        PyObject *item = PyList_GET_ITEM(round_, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 4 || !PyList_CheckExact(PyTuple_GET_ITEM(item, 0))
            || !PyLong_CheckExact(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "a round holds (bodies: list, nbytes: int, who, token) tuples");
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(ack_round_doc,
             "ack_round(round_, head) -> (messages, nbytes, to_flush)\n\n"
             "Hand out the id ranges of a committed round whose last message has id\n"
             "``head``, in order: a lane's MSG (token None) through its lane_ack, any\n"
             "other through ``who.batch_done(token, last_id)``; then each lane's\n"
             "lane_send, once, in the order the lanes first came. ``to_flush`` lists\n"
             "those that answered True, in order (repeats included).");

/* Tell one batch of a round: a lane's MSG (its OK gathered; the lane noted in
 * ``lanes``) or another's (batch_done, ``who`` noted in ``to_flush`` if it
 * asks). 0, or -1 with an exception set. */
static int
ack_one(PyObject *item, long long last, PyObject *lanes, PyObject *to_flush)
{
    PyObject *who = PyTuple_GET_ITEM(item, 2);
    PyObject *token = PyTuple_GET_ITEM(item, 3);
    if (token == Py_None) {
        if (PyDict_SetItem(lanes, who, Py_None) < 0)
            return -1;
        if (PyObject_TypeCheck(who, &LaneType))
            return lane_ack((Lane *)who, PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1)), last);
    }
    PyObject *last_id = PyLong_FromLongLong(last);
    if (last_id == NULL)
        return -1;
    PyObject *r;
    if (token == Py_None)
        r = PyObject_CallMethodObjArgs(who, str_lane_ack, PyTuple_GET_ITEM(item, 1), last_id, NULL);
    else
        r = PyObject_CallMethodObjArgs(who, str_batch_done, token, last_id, NULL);
    Py_DECREF(last_id);
    if (r == NULL)
        return -1;
    int rc = token == Py_None ? 0 : PyObject_IsTrue(r);
    Py_DECREF(r);
    if (rc > 0 && PyList_Append(to_flush, who) < 0)
        return -1;
    return rc < 0 ? -1 : 0;
}

/* lane_send for each of ``lanes``, in order: -1 with an exception set at the
 * first that fails (as the twin's loop stops there), else 0. */
static int
send_all(PyObject *lanes, PyObject *to_flush)
{
    Py_ssize_t pos = 0;
    PyObject *lane, *value;
    while (PyDict_Next(lanes, &pos, &lane, &value)) {
        int rc;
        if (PyObject_TypeCheck(lane, &LaneType)) {
            rc = lane_send((Lane *)lane);
        } else {
            PyObject *r = PyObject_CallMethodNoArgs(lane, str_lane_send);
            rc = r == NULL ? -1 : PyObject_IsTrue(r);
            Py_XDECREF(r);
        }
        if (rc < 0 || (rc > 0 && PyList_Append(to_flush, lane) < 0))
            return -1;
    }
    return 0;
}

static PyObject *
ack_round(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ack_round(round_, head)");
        return NULL;
    }
    PyObject *round_ = args[0];
    long long head = PyLong_AsLongLong(args[1]);
    if (head == -1 && PyErr_Occurred())
        return NULL;
    if (check_round(round_) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(round_);
    long long messages = 0, nbytes = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(round_, i);
        messages += PyList_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        nbytes += PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1));
    }
    if (PyErr_Occurred())
        return NULL;
    PyObject *to_flush = PyList_New(0);
    PyObject *lanes = PyDict_New(); /* the lanes with OKs gathered, in the order they came */
    if (to_flush == NULL || lanes == NULL)
        goto fail;
    Py_INCREF(round_); /* batch_done runs Python */
    long long first = head + 1 - messages;
    int failed = 0;
    for (Py_ssize_t i = 0; i < count && i < PyList_GET_SIZE(round_) && !failed; i++) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(round_, i));
        first += PyList_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        failed = ack_one(item, first - 1, lanes, to_flush) < 0;
        Py_DECREF(item);
    }
    Py_DECREF(round_);
    /* Even after a failure: an OK gathered and not sent would hold that connection's
     * later replies for ever. The first error is the one raised. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    int send_failed = send_all(lanes, to_flush) < 0;
    if (failed) {
        if (send_failed)
            PyErr_Clear();
        PyErr_Restore(type, value, traceback);
    }
    if (failed || send_failed)
        goto fail;
    Py_DECREF(lanes);
    return Py_BuildValue("(LLN)", messages, nbytes, to_flush);
fail:
    Py_XDECREF(to_flush);
    Py_XDECREF(lanes);
    return NULL;
}

PyDoc_STRVAR(gather_doc,
             "gather(round_) -> (bodies, nbytes)\n\n"
             "Every body of a round, in order, and their total size (one write for all).");

static PyObject *
gather(PyObject *module, PyObject *round_)
{
    if (check_round(round_) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(round_);
    if (count == 1) {
        PyObject *item = PyList_GET_ITEM(round_, 0);
        return PyTuple_Pack(2, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1));
    }
    PyObject *bodies = PyList_New(0);
    if (bodies == NULL)
        return NULL;
    long long nbytes = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(round_, i);
        Py_ssize_t end = PyList_GET_SIZE(bodies);
        if (PyList_SetSlice(bodies, end, end, PyTuple_GET_ITEM(item, 0)) < 0) {
            Py_DECREF(bodies);
            return NULL;
        }
        nbytes += PyLong_AsLongLong(PyTuple_GET_ITEM(item, 1));
    }
    if (PyErr_Occurred()) {
        Py_DECREF(bodies);
        return NULL;
    }
    return Py_BuildValue("(NL)", bodies, nbytes);
}

static PyMethodDef lane_functions[] = {
    {"ack_round", (PyCFunction)(void (*)(void))ack_round, METH_FASTCALL, ack_round_doc},
    {"gather", (PyCFunction)gather, METH_O, gather_doc},
    {NULL},
};

int
lane_add_types(PyObject *module)
{
    if ((str_slow_received = PyUnicode_InternFromString("slow_received")) == NULL
        || (str_flush = PyUnicode_InternFromString("flush")) == NULL
        || (str_lane_ack = PyUnicode_InternFromString("lane_ack")) == NULL
        || (str_lane_send = PyUnicode_InternFromString("lane_send")) == NULL
        || (str_batch_done = PyUnicode_InternFromString("batch_done")) == NULL)
        return -1;
    if (PyType_Ready(&HubType) < 0 || PyType_Ready(&LaneType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "Hub", (PyObject *)&HubType) < 0
        || PyModule_AddObjectRef(module, "Lane", (PyObject *)&LaneType) < 0)
        return -1;
    return PyModule_AddFunctions(module, lane_functions);
}
