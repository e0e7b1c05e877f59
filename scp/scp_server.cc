// scp/scp_server.cc: the Storage SCP on dcmtk's association and DIMSE layers.
//
// One listener thread accepts associations; each accepted association gets a
// thread of its own. A C-STORE dataset is streamed bit for bit into a temp
// file behind a freshly written file meta header, fsynced, parsed, checked,
// and handed to the caller's store callback; only its answer is sent back.
// The listener also enforces each association's total deadline by shutting
// its socket down, which wakes the blocked read in the worker.
#include "scp.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/dul.h>
#include <dcmtk/dcmtls/tlslayer.h>
#include <openssl/evp.h>

#include "io.h"
#include "log.h"
#include "scp_inflate.h"

namespace
{

using Clock = std::chrono::steady_clock;

// Longest a TLS connection may take for its handshake and request (or the
// ACSE timeout, when shorter) while it holds up the other new ones.
const int TLS_ACCEPT_S = 10;

struct Peer {
    std::string ae;
    std::string host; // empty: any host
};

// Scanners keep Nagle on: their last small segment of a message waits for
// our ACK, which Linux delays up to 40 ms. Asking for a quick ACK whenever
// data has arrived sends any pending ACK at once, and removes that stall
// from our side.
void quickack(int sock)
{
    int one = 1;
    if (sock >= 0) setsockopt(sock, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

// A DcmConsumer that writes to a file descriptor and never fails towards
// dcmtk: a write error (disk full) or the size cap is remembered and the rest
// of the dataset is read off the wire and dropped, so the association stays
// in step and the peer gets a proper A700 instead of an abort. From
// start_digest() on, the bytes written are also hashed (SHA-256): the
// dataset as the peer sent it, without our meta header, so that a re-sent
// identical instance is known for what it is.
class SpoolConsumer : public DcmConsumer
{
  public:
    SpoolConsumer(int fd, int64_t cap, int sock) : fd_(fd), cap_(cap), sock_(sock) {}
    ~SpoolConsumer() override
    {
        EVP_MD_CTX_free(md_);
    }
    SpoolConsumer(const SpoolConsumer &) = delete;
    SpoolConsumer &operator=(const SpoolConsumer &) = delete;
    void start_digest()
    {
        md_ = EVP_MD_CTX_new();
        if (md_ && EVP_DigestInit_ex(md_, EVP_sha256(), nullptr) != 1) {
            EVP_MD_CTX_free(md_);
            md_ = nullptr;
        }
        if (!md_ && err_ == 0) err_ = ENOMEM;
    }
    // The digest as 64 hex digits; false when it could not be computed.
    bool digest(char out[65])
    {
        unsigned char d[EVP_MAX_MD_SIZE];
        unsigned len = 0;
        if (!md_ || EVP_DigestFinal_ex(md_, d, &len) != 1 || len != 32) return false;
        for (unsigned i = 0; i < len; i++)
            snprintf(out + 2 * i, 3, "%02x", d[i]);
        return true;
    }
    OFBool good() const override
    {
        return OFTrue;
    }
    OFCondition status() const override
    {
        return EC_Normal;
    }
    OFBool isFlushed() const override
    {
        return OFTrue;
    }
    offile_off_t avail() const override
    {
        return 1 << 20;
    }
    offile_off_t write(const void *buf, offile_off_t len) override
    {
        quickack(sock_);
        if (err_ == 0 && written_ + len > cap_) err_ = EFBIG;
        const char *p = static_cast<const char *>(buf);
        offile_off_t left = len;
        while (err_ == 0 && left > 0) {
            ssize_t w = ::write(fd_, p, (size_t)left);
            if (w < 0) {
                if (errno == EINTR) continue;
                err_ = errno;
                break;
            }
            if (md_ && EVP_DigestUpdate(md_, p, (size_t)w) != 1) err_ = EIO;
            p += w;
            left -= w;
            written_ += w;
        }
        return len;
    }
    void flush() override {}
    int error() const
    {
        return err_;
    }
    int64_t written() const
    {
        return written_;
    }

  private:
    int fd_;
    int64_t cap_;
    int sock_;
    int64_t written_ = 0;
    int err_ = 0;
    EVP_MD_CTX *md_ = nullptr;
};

class SpoolStream : public DcmOutputStream
{
  public:
    explicit SpoolStream(SpoolConsumer *c) : DcmOutputStream(c) {}
};

// Which connections count: all, those past their A-ASSOCIATE-RQ (against
// max_associations), or those not yet (against their own cap).
// TLS connections in their handshake and request have a cap of their own,
// so peers on one port cannot crowd out those on the other.
enum class Counted { ALL, ASSOCIATED, WAITING, TLS_WAITING };

struct Assoc {
    T_ASC_Association *assoc = nullptr;
    int fd = -1;
    // TLS, until its request is read (receive_tls_request): the accepted
    // socket, a copy of it kept open while dcmtk may close the socket (so
    // its number cannot be reused meanwhile), which check_deadlines and the
    // stop shut down to cut it, and when that is due. Under mu.
    bool tls = false;
    int tls_raw = -1, tls_guard = -1;
    bool tls_cut = false;
    Clock::time_point tls_until;
    std::atomic<bool> associated{false}; // holds a slot: counts against max_associations
    Clock::time_point deadline;
    std::atomic<bool> expired{false};
    std::atomic<bool> finished{false};
    std::thread thread;
    unsigned long id = 0;
};

// Whether dcmtk took over the socket given it (dcmExternalSocketHandle) in
// this thread's last ASC_receiveAssociation: it has once it asks the
// network's layer for the connection. From then on the socket is dcmtk's,
// closed with the association (or at once, when the TLS handshake fails);
// before then dcmtk may give up (getpeername fails on a connection the peer
// has reset, a setsockopt fails) and leaves it open, so it is ours to close.
// Each connection reset right after its request had stayed open for the
// life of the node. (dcmtk's TCP wrapper check, the one failure before it
// takes the socket that closes it, runs only with dcmTCPWrapperDaemonName
// set, which the node never sets.)
thread_local bool t_socket_taken = false;
// The hold on accept_mu of this thread's ASC_receiveAssociation on the TLS
// network, which TlsAcceptLayer lets go of (one per thread: several TLS
// connections do their handshakes at once).
thread_local std::unique_lock<std::mutex> *t_accept_lock = nullptr;

// The plain listener's transport layer: dcmtk's own, telling when it took
// the socket.
class PlainAcceptLayer : public DcmTransportLayer
{
  public:
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        t_socket_taken = true;
        return DcmTransportLayer::createConnection(sock, secure);
    }
};

// The TLS network's transport layer. dcmtk takes an accepted socket from a
// process-wide variable (dcmExternalSocketHandle), so whoever sets it holds
// accept_mu until dcmtk has read it; dcmtk has read it when it asks the
// layer for the connection, before the handshake. Here the connection's
// hold on accept_mu ends: the handshake and the request after it may take
// up to TLS_ACCEPT_S from a peer nobody has authenticated yet, and held
// through them, they held up every other association meanwhile.
class TlsAcceptLayer : public DcmTLSTransportLayer
{
  public:
    TlsAcceptLayer() : DcmTLSTransportLayer(NET_ACCEPTOR, nullptr, OFTrue) {}
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        t_socket_taken = true;
        if (t_accept_lock && t_accept_lock->owns_lock()) {
            dcmExternalSocketHandle.set(-1);
            t_accept_lock->unlock();
        }
        return DcmTLSTransportLayer::createConnection(sock, secure);
    }
};

// The transfer syntaxes we accept, in order of preference. Every one can be
// decoded by dcmtk for triage; files are kept in the syntax they came in.
const char *kTransferSyntaxes[] = {
    UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax,
    UID_BigEndianExplicitTransferSyntax,    UID_DeflatedExplicitVRLittleEndianTransferSyntax,
    UID_JPEGProcess1TransferSyntax,         UID_JPEGProcess2_4TransferSyntax,
    UID_JPEGProcess14TransferSyntax,        UID_JPEGProcess14SV1TransferSyntax,
    UID_JPEGLSLosslessTransferSyntax,       UID_JPEGLSLossyTransferSyntax,
    UID_RLELosslessTransferSyntax,
};

} // namespace

struct scp_server {
    scp_server_config cfg{};
    std::string aetitle, tmp_dir;
    T_ASC_Network *net = nullptr;
    std::thread listener;
    std::string tls_cert, tls_key, tls_ca;
    T_ASC_Network *tls_net = nullptr;
    TlsAcceptLayer *tls_layer = nullptr;
    std::thread tls_listener;
    std::atomic<bool> stopping{false};
    std::mutex mu;        // guards assocs and peers
    std::mutex accept_mu; // from setting dcmExternalSocketHandle until dcmtk has read it
    std::list<Assoc *> assocs;
    std::vector<Peer> peers;
    unsigned long next_id = 1;
    std::atomic<unsigned long> tmp_seq{0};
    std::atomic<uint64_t> n_accepted{0}, n_rej_called{0}, n_rej_calling{0}, n_rej_limit{0},
        n_rej_context{0}, n_conn_failed{0}, n_stored{0}, n_incomplete{0};
    std::atomic<uint64_t> n_refused[SCP_REFUSED_NKINDS]{};

    void listen_loop();
    void tls_listen_loop();
    void add_assoc(int fd, bool tls);
    int start_tls(char *err, size_t errlen);
    void reap(bool all);
    void check_deadlines();
    void run_assoc(Assoc *a);
    bool receive_request(Assoc *a);
    bool receive_tls_request(Assoc *a);
    size_t count(Counted which);
    size_t count_locked(Counted which); // mu held
    bool claim_slot(Assoc *a, size_t *busy);
    bool peer_allowed(const char *ae, const char *host);
    OFCondition handle_store(Assoc *a, T_ASC_PresentationContextID pres_id, T_DIMSE_C_StoreRQ *req,
                             unsigned *stored, unsigned *failed);
};

namespace
{

int parse_peers(const char *s, std::vector<Peer> *out, char *err, size_t errlen)
{
    out->clear();
    std::string all = s ? s : "";
    size_t pos = 0;
    while (pos <= all.size()) {
        size_t comma = all.find(',', pos);
        if (comma == std::string::npos) comma = all.size();
        std::string item = all.substr(pos, comma - pos);
        pos = comma + 1;
        size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
        if (b == std::string::npos) continue;
        item = item.substr(b, e - b + 1);
        Peer p;
        size_t at = item.find('@');
        p.ae = item.substr(0, at);
        if (at != std::string::npos) p.host = item.substr(at + 1);
        if (p.ae.empty() || p.ae.size() > 16 || (at != std::string::npos && p.host.empty())) {
            snprintf(err, errlen, "bad entry in dicom.allowed_peers: '%s'", item.c_str());
            return -1;
        }
        out->push_back(p);
    }
    return 0;
}

// A condition's text, on one line, for a log value (key="...") or a
// message: dcmtk's dump puts each sub-condition on a line of its own, which
// split a log record in two.
std::string cond_text(const OFCondition &c)
{
    OFString dumped;
    DimseCondition::dump(dumped, c);
    std::string out;
    for (const char *p = dumped.c_str(); *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '\n')
            out += p[1] ? "; " : "";
        else if (ch < ' ' || ch == 0x7f)
            out += ' ';
        else
            out += ch == '"' ? '\'' : (char)ch;
    }
    return out;
}

// An AE title without its leading and trailing spaces, which are not
// significant (PS3.5 6.2): " ICHTRIAGE" is ICHTRIAGE.
std::string ae_trim(const char *ae)
{
    std::string s = ae ? ae : "";
    size_t b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// The peer's address as dcmtk gives it may carry a port ("host:port").
std::string host_only(const char *addr)
{
    std::string a = addr ? addr : "";
    size_t colon = a.rfind(':');
    if (colon != std::string::npos && a.find(':') == colon) a = a.substr(0, colon);
    return a;
}

// Sends an A-ABORT and returns at once. dcmtk's abort then waits for the
// peer to close the connection (up to the ARTIM timeout, the acse timeout),
// so a peer that sent garbage and never closes held this thread and an
// association slot that long; with our read side shut down that wait ends
// at the first read. The A-ABORT is written before it; the FIN follows.
void abort_now(T_ASC_Association *assoc, int fd)
{
    if (fd >= 0) shutdown(fd, SHUT_RD);
    ASC_abortAssociation(assoc);
}

void reject(T_ASC_Association *assoc, T_ASC_RejectParametersResult result,
            T_ASC_RejectParametersSource source, T_ASC_RejectParametersReason reason)
{
    T_ASC_RejectParameters rej = {result, source, reason};
    ASC_rejectAssociation(assoc, &rej);
}

// Writes a DICOM file meta header (preamble, DICM, group 0002) for a dataset
// arriving in transfer syntax ts, so the spooled file is a normal Part 10
// file whose dataset bytes are exactly what the peer sent.
bool write_meta(DcmOutputStream &out, const char *sop_class, const char *sop_uid, const char *ts,
                const char *calling_ae)
{
    DcmFileFormat ff;
    DcmMetaInfo *mi = ff.getMetaInfo();
    Uint8 version[2] = {0, 1};
    mi->putAndInsertUint8Array(DCM_FileMetaInformationVersion, version, 2);
    mi->putAndInsertString(DCM_MediaStorageSOPClassUID, sop_class);
    mi->putAndInsertString(DCM_MediaStorageSOPInstanceUID, sop_uid);
    mi->putAndInsertString(DCM_TransferSyntaxUID, ts);
    mi->putAndInsertString(DCM_ImplementationClassUID, OFFIS_IMPLEMENTATION_CLASS_UID);
    mi->putAndInsertString(DCM_ImplementationVersionName, "ICHTRIAGE");
    if (calling_ae && calling_ae[0])
        mi->putAndInsertString(DCM_SourceApplicationEntityTitle, calling_ae);
    if (mi->computeGroupLengthAndPadding(EGL_withGL, EPD_noChange,
                                         META_HEADER_DEFAULT_TRANSFERSYNTAX, EET_ExplicitLength)
            .bad())
        return false;
    mi->transferInit();
    OFCondition c = mi->write(out, META_HEADER_DEFAULT_TRANSFERSYNTAX, EET_ExplicitLength, nullptr);
    mi->transferEnd();
    return c.good();
}

} // namespace

bool scp_server::peer_allowed(const char *ae, const char *host)
{
    std::lock_guard<std::mutex> g(mu);
    if (peers.empty()) return true;
    for (const Peer &p : peers)
        if (p.ae == ae && (p.host.empty() || p.host == host)) return true;
    return false;
}

OFCondition scp_server::handle_store(Assoc *a, T_ASC_PresentationContextID pres_id,
                                     T_DIMSE_C_StoreRQ *req, unsigned *stored, unsigned *failed)
{
    T_ASC_Association *assoc = a->assoc;
    // As the association was judged (ae_trim): what the file's meta header,
    // the index and the log record.
    std::string calling_ae = ae_trim(assoc->params->DULparams.callingAPTitle);
    const char *calling = calling_ae.c_str();
    std::string peer = host_only(assoc->params->DULparams.callingPresentationAddress);
    // The request's UID is the peer's text: quotes and '=' in it broke the
    // key=value records it was logged in. A valid UID passes unchanged.
    char sop[sizeof req->AffectedSOPInstanceUID];
    util_log_safe(sop, sizeof sop, req->AffectedSOPInstanceUID);
    T_DIMSE_C_StoreRSP rsp;
    memset(&rsp, 0, sizeof rsp);
    rsp.MessageIDBeingRespondedTo = req->MessageID;
    OFStandard::strlcpy(rsp.AffectedSOPClassUID, req->AffectedSOPClassUID,
                        sizeof rsp.AffectedSOPClassUID);
    OFStandard::strlcpy(rsp.AffectedSOPInstanceUID, req->AffectedSOPInstanceUID,
                        sizeof rsp.AffectedSOPInstanceUID);
    rsp.opts = O_STORE_AFFECTEDSOPCLASSUID | O_STORE_AFFECTEDSOPINSTANCEUID;
    rsp.DataSetType = DIMSE_DATASET_NULL;
    char reason[512] = "";
    unsigned status = SCP_STATUS_SUCCESS;
    scp_refusal why = SCP_REFUSED_NONE;
    OFCondition cond = EC_Normal;
    auto t0 = Clock::now();

    // The request's SOP class must be its context's abstract syntax, and a
    // storage class (PS3.7 9.1.1): a CT image on the Verification context,
    // an MR image or a private class on the CT context had been stored.
    T_ASC_PresentationContext pc;
    bool pc_found = ASC_findAcceptedPresentationContext(assoc->params, pres_id, &pc).good();
    if (!pc_found || strcmp(pc.abstractSyntax, req->AffectedSOPClassUID) != 0 ||
        !scp_sop_class_storable(req->AffectedSOPClassUID)) {
        char cls[sizeof req->AffectedSOPClassUID];
        util_log_safe(cls, sizeof cls, req->AffectedSOPClassUID);
        if (!pc_found)
            snprintf(reason, sizeof reason, "no accepted presentation context %u",
                     (unsigned)pres_id);
        else if (strcmp(pc.abstractSyntax, req->AffectedSOPClassUID) != 0)
            snprintf(reason, sizeof reason, "SOP class %s sent on the presentation context of %s",
                     cls, pc.abstractSyntax);
        else
            snprintf(reason, sizeof reason, "SOP class %s is not a storage class", cls);
        DIC_UL bits = 0, bytes = 0;
        cond = DIMSE_ignoreDataSet(assoc, DIMSE_NONBLOCKING, cfg.dimse_timeout, &bits, &bytes);
        status = SCP_STATUS_SOP_CLASS_NOT_SUPPORTED;
        why = SCP_REFUSED_UNSUPPORTED;
    } else if (cfg.space && cfg.space(cfg.ud, reason, sizeof reason) != 0) {
        // No room: read the dataset off the wire without storing it.
        DIC_UL bits = 0, bytes = 0;
        cond = DIMSE_ignoreDataSet(assoc, DIMSE_NONBLOCKING, cfg.dimse_timeout, &bits, &bytes);
        status = SCP_STATUS_OUT_OF_RESOURCES;
        why = SCP_REFUSED_LOW_SPACE;
    } else {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s/%ld-%lu-%lu.part", tmp_dir.c_str(), (long)getpid(), a->id,
                 tmp_seq.fetch_add(1));
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0) {
            snprintf(reason, sizeof reason, "cannot create temp file: %s", strerror(errno));
            why = scp_refusal_from_errno(errno);
            DIC_UL bits = 0, bytes = 0;
            cond = DIMSE_ignoreDataSet(assoc, DIMSE_NONBLOCKING, cfg.dimse_timeout, &bits, &bytes);
            status = SCP_STATUS_OUT_OF_RESOURCES;
        } else {
            SpoolConsumer consumer(fd, cfg.max_instance_bytes, a->fd);
            char digest[65] = "";
            {
                SpoolStream out(&consumer);
                bool meta_ok =
                    write_meta(out, req->AffectedSOPClassUID, req->AffectedSOPInstanceUID,
                               pc.acceptedTransferSyntax, calling);
                out.flush(); // the meta header is ours: not in the digest
                consumer.start_digest();
                T_ASC_PresentationContextID data_pres = pres_id;
                cond = DIMSE_receiveDataSetInFile(assoc, DIMSE_NONBLOCKING, cfg.dimse_timeout,
                                                  &data_pres, &out, nullptr, nullptr);
                // A dataset travels on its command's context (PS3.7 6.3.1);
                // one on another was filed in the command context's syntax.
                if (cond.good() && data_pres != pres_id) {
                    char text[96];
                    snprintf(text, sizeof text,
                             "dataset on presentation context %u, its command on %u",
                             (unsigned)data_pres, (unsigned)pres_id);
                    cond = makeDcmnetCondition(DIMSEC_INVALIDPRESENTATIONCONTEXTID, OF_error, text);
                }
                if (cond.good() && !meta_ok) {
                    status = SCP_STATUS_OUT_OF_RESOURCES;
                    why = SCP_REFUSED_IO;
                    snprintf(reason, sizeof reason, "cannot write file meta header");
                }
            }
            if (cond.good() && status == SCP_STATUS_SUCCESS) {
                if (consumer.error() == EFBIG) {
                    status = SCP_STATUS_OUT_OF_RESOURCES;
                    why = SCP_REFUSED_TOO_LARGE;
                    snprintf(reason, sizeof reason, "dataset larger than %lld bytes",
                             (long long)cfg.max_instance_bytes);
                } else if (consumer.error() != 0) {
                    status = SCP_STATUS_OUT_OF_RESOURCES;
                    why = scp_refusal_from_errno(consumer.error());
                    snprintf(reason, sizeof reason, "write failed: %s", strerror(consumer.error()));
                } else if (fdatasync(fd) != 0) {
                    status = SCP_STATUS_OUT_OF_RESOURCES;
                    why = scp_refusal_from_errno(errno);
                    snprintf(reason, sizeof reason, "fdatasync failed: %s", strerror(errno));
                } else if (!consumer.digest(digest)) {
                    status = SCP_STATUS_OUT_OF_RESOURCES;
                    why = SCP_REFUSED_IO;
                    snprintf(reason, sizeof reason, "cannot compute the content digest");
                }
            }
            close(fd);
            // A deflated dataset is loaded whole by dcmtk: one that inflates
            // beyond the size cap, or whose lengths claim more than it holds,
            // is refused before it is parsed.
            int deflated = 0;
            if (cond.good() && status == SCP_STATUS_SUCCESS &&
                strcmp(pc.acceptedTransferSyntax,
                       UID_DeflatedExplicitVRLittleEndianTransferSyntax) == 0)
                deflated = scp_deflated_check(tmp, cfg.max_instance_bytes, reason, sizeof reason);
            if (deflated == 1) {
                status = SCP_STATUS_OUT_OF_RESOURCES;
                why = SCP_REFUSED_TOO_LARGE;
            } else if (deflated == 2) {
                status = SCP_STATUS_CANNOT_UNDERSTAND;
                why = SCP_REFUSED_UNDERSTAND;
            }
            if (cond.good() && status == SCP_STATUS_SUCCESS) {
                scp_info info;
                char err[512];
                if (scp_info_read(tmp, &info, err, sizeof err) != 0) {
                    status = SCP_STATUS_CANNOT_UNDERSTAND;
                    why = SCP_REFUSED_UNDERSTAND;
                    snprintf(reason, sizeof reason, "%s", err);
                } else if (info.overlong_uid) {
                    status = SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS;
                    why = SCP_REFUSED_SOP_CLASS;
                    snprintf(reason, sizeof reason, "invalid %s UID: %d characters, at most 64",
                             info.overlong_uid, info.overlong_uid_len);
                } else if (strcmp(info.sop_class, req->AffectedSOPClassUID) != 0) {
                    status = SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS;
                    why = SCP_REFUSED_SOP_CLASS;
                    char cls[sizeof info.sop_class];
                    snprintf(reason, sizeof reason,
                             "SOP class in dataset (%s) is not the one requested",
                             info.sop_class[0] ? util_log_safe(cls, sizeof cls, info.sop_class)
                                               : "missing");
                } else if (strcmp(info.sop_uid, req->AffectedSOPInstanceUID) != 0) {
                    status = SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS;
                    why = SCP_REFUSED_SOP_CLASS;
                    snprintf(reason, sizeof reason,
                             "SOP instance UID in dataset differs from the request");
                } else if (!scp_uid_valid(info.study_uid) || !scp_uid_valid(info.series_uid) ||
                           !scp_uid_valid(info.sop_uid)) {
                    status = SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS;
                    why = SCP_REFUSED_SOP_CLASS;
                    snprintf(reason, sizeof reason, "missing or invalid %s UID",
                             !scp_uid_valid(info.study_uid)    ? "study"
                             : !scp_uid_valid(info.series_uid) ? "series"
                                                               : "SOP instance");
                } else {
                    scp_received r = {tmp,    &info,   consumer.written(),
                                      digest, calling, peer.c_str()};
                    status = cfg.store(cfg.ud, &r, &why, reason, sizeof reason);
                }
            }
            unlink(tmp); // gone already when the store callback moved it
        }
    }

    if (cond.bad()) {
        // The dataset never arrived whole: nothing was stored, no answer is
        // possible; the caller ends the association.
        util_log(UTIL_LOG_WARN, "store_incomplete", "assoc=%lu sop=%s reason=\"%s\"", a->id, sop,
                 cond_text(cond).c_str());
        (*failed)++;
        n_incomplete++;
        return cond;
    }
    rsp.DimseStatus = (Uint16)status;
    long ms =
        (long)std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
    if (status != SCP_STATUS_SUCCESS && why == SCP_REFUSED_NONE) // a store callback that forgot
        why = status == SCP_STATUS_DOES_NOT_MATCH_SOP_CLASS ? SCP_REFUSED_SOP_CLASS
              : status == SCP_STATUS_CANNOT_UNDERSTAND      ? SCP_REFUSED_UNDERSTAND
                                                            : SCP_REFUSED_IO;
    if (status == SCP_STATUS_SUCCESS) why = SCP_REFUSED_NONE;
    (status == SCP_STATUS_SUCCESS ? n_stored : n_refused[why])++;
    if (cfg.outcome) cfg.outcome(cfg.ud, status, why, reason);
    if (status == SCP_STATUS_SUCCESS) {
        (*stored)++;
        util_log(UTIL_LOG_DEBUG, "instance_stored", "assoc=%lu sop=%s ms=%ld", a->id, sop, ms);
    } else {
        (*failed)++;
        char safe[64];
        util_log(UTIL_LOG_WARN, "store_failed",
                 "assoc=%lu calling_ae=%s sop=%s status=0x%04X why=%s reason=\"%s\"", a->id,
                 util_log_safe(safe, sizeof safe, calling), sop, status, scp_refusal_name(why),
                 reason);
    }
    OFCondition sent = DIMSE_sendStoreResponse(assoc, pres_id, req, &rsp, nullptr);
    quickack(a->fd); // the next request's first segment is ACKed at once too
    return sent;
}

// Waits (up to the ACSE timeout) until the whole A-ASSOCIATE-RQ PDU is in
// the socket buffer, then lets dcmtk parse it from there, one connection at
// a time because dcmtk takes the socket from a process-wide variable. A
// request larger than the peek buffer is refused: dcmtk never waits on the
// network while it holds that lock.
bool scp_server::receive_request(Assoc *a)
{
    const size_t cap = 65536;
    std::vector<unsigned char> buf(cap);
    auto until = Clock::now() + std::chrono::seconds(cfg.acse_timeout);
    size_t want = 6;
    bool have_len = false; // not want == 6: a PDU that claims length 0 must end the wait too
    const char *why = nullptr;
    uint32_t claimed = 0; // a first PDU's length over the cap
    bool rq = false;
    for (;;) {
        ssize_t n = recv(a->fd, buf.data(), want, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0) {
            why = "closed_before_request";
            break;
        }
        if (n > 0 && (size_t)n >= 6 && !have_len) {
            uint32_t len = ((uint32_t)buf[2] << 24) | ((uint32_t)buf[3] << 16) |
                           ((uint32_t)buf[4] << 8) | buf[5];
            if (6 + (size_t)len > cap) {
                // dcmtk would read the part beyond the cap under accept_mu,
                // waiting on the peer: one that stalls there held every new
                // association up for a minute, or for the association
                // deadline when it trickles. Real requests are a few kB.
                claimed = len;
                rq = buf[0] == 0x01;
                why = "request_too_large";
                break;
            }
            want = std::min<size_t>(cap, 6 + (size_t)len);
            have_len = true;
            continue;
        }
        if (n > 0 && (size_t)n >= want) break;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            why = "socket_error";
            break;
        }
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
        if (left.count() <= 0 || stopping) {
            why = stopping ? "shutting_down" : "no_request_before_acse_timeout";
            break;
        }
        if (n > 0) {
            // Part of the PDU is here; poll() would return at once, so wait a little.
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        } else {
            struct pollfd pfd = {a->fd, POLLIN, 0};
            poll(&pfd, 1, (int)std::min<long>(left.count(), 500));
        }
    }
    if (why) {
        n_conn_failed++;
        if (claimed) {
            util_log(UTIL_LOG_WARN, "association_failed",
                     "assoc=%lu reason=%s length=%lu limit=%zu", a->id, why, (unsigned long)claimed,
                     cap - 6);
            // A-ASSOCIATE-RJ: permanent, from the ACSE service provider, no
            // reason given (PS3.8 9.3.4), so the peer is told, not just cut.
            static const unsigned char rj[10] = {0x03, 0, 0, 0, 0, 4, 0, 1, 2, 1};
            if (rq) (void)!send(a->fd, rj, sizeof rj, MSG_NOSIGNAL | MSG_DONTWAIT);
        } else {
            util_log(UTIL_LOG_WARN, "association_failed", "assoc=%lu reason=%s", a->id, why);
        }
        std::lock_guard<std::mutex> g(mu);
        close(a->fd);
        a->fd = -1;
        return false;
    }
    OFCondition c;
    T_ASC_Association *assoc = nullptr;
    {
        std::lock_guard<std::mutex> g(accept_mu);
        dcmExternalSocketHandle.set(a->fd);
        t_socket_taken = false;
        c = ASC_receiveAssociation(net, &assoc, cfg.max_pdu, nullptr, nullptr, OFFalse, DUL_BLOCK,
                                   cfg.acse_timeout);
        dcmExternalSocketHandle.set(-1);
    }
    if (c.bad()) {
        n_conn_failed++;
        util_log(UTIL_LOG_WARN, "association_failed", "assoc=%lu reason=\"%s\"", a->id,
                 cond_text(c).c_str());
        std::lock_guard<std::mutex> g(mu);
        if (assoc) {
            ASC_dropAssociation(assoc); // closes the socket if dcmtk has it
            ASC_destroyAssociation(&assoc);
        }
        if (!t_socket_taken) close(a->fd);
        a->fd = -1;
        return false;
    }
    a->assoc = assoc;
    return true;
}

void scp_server::run_assoc(Assoc *a)
{
    if (!(a->tls ? receive_tls_request(a) : receive_request(a))) {
        a->finished = true;
        return;
    }
    T_ASC_Association *assoc = a->assoc;
    std::string calling_ae = ae_trim(assoc->params->DULparams.callingAPTitle);
    std::string called_ae = ae_trim(assoc->params->DULparams.calledAPTitle);
    char calling[64], called[64];
    util_log_safe(calling, sizeof calling, calling_ae.c_str());
    util_log_safe(called, sizeof called, called_ae.c_str());
    std::string peer = host_only(assoc->params->DULparams.callingPresentationAddress);
    unsigned stored = 0, failed = 0;
    auto t0 = Clock::now();
    const char *end_reason = "released";
    std::string detail; // the condition that ended it, if one did

    if (called_ae != aetitle) {
        reject(assoc, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
               ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED);
        util_log(UTIL_LOG_WARN, "association_rejected",
                 "assoc=%lu calling_ae=%s called_ae=%s peer=%s reason=called_ae_not_ours", a->id,
                 calling, called, peer.c_str());
        n_rej_called++;
        goto done;
    }
    if (!peer_allowed(calling_ae.c_str(), peer.c_str())) {
        reject(assoc, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
               ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED);
        util_log(UTIL_LOG_WARN, "association_rejected",
                 "assoc=%lu calling_ae=%s called_ae=%s peer=%s reason=calling_peer_not_allowed",
                 a->id, calling, called, peer.c_str());
        n_rej_calling++;
        goto done;
    }
    {
        // Count this association only now that it is one, and after the
        // permanent refusals: a peer with a wrong AE title is told so, not
        // asked to retry, while the node is full. Over the limit it is
        // refused as transient, so the peer may retry later.
        size_t busy = 0;
        if (!claim_slot(a, &busy)) {
            reject(assoc, ASC_RESULT_REJECTEDTRANSIENT,
                   ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
                   ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED);
            util_log(UTIL_LOG_WARN, "association_rejected",
                     "assoc=%lu calling_ae=%s peer=%s reason=%s active=%zu limit=%d", a->id,
                     calling, peer.c_str(), stopping ? "shutting_down" : "too_many_associations",
                     busy, cfg.max_associations);
            n_rej_limit++;
            goto done;
        }
    }
    {
        const char *verification[] = {UID_VerificationSOPClass};
        const int nts = (int)(sizeof kTransferSyntaxes / sizeof kTransferSyntaxes[0]);
        OFCondition c = ASC_acceptContextsWithPreferredTransferSyntaxes(assoc->params, verification,
                                                                        1, kTransferSyntaxes, 3);
        if (c.good())
            c = ASC_acceptContextsWithPreferredTransferSyntaxes(
                assoc->params, const_cast<const char **>(dcmAllStorageSOPClassUIDs),
                numberOfDcmAllStorageSOPClassUIDs, kTransferSyntaxes, nts);
        if (c.bad() || ASC_countAcceptedPresentationContexts(assoc->params) == 0) {
            reject(assoc, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
                   ASC_REASON_SU_NOREASON);
            util_log(UTIL_LOG_WARN, "association_rejected",
                     "assoc=%lu calling_ae=%s peer=%s reason=no_acceptable_presentation_context",
                     a->id, calling, peer.c_str());
            n_rej_context++;
            goto done;
        }
        if (ASC_acknowledgeAssociation(assoc).bad()) {
            end_reason = "acknowledge_failed";
            goto done;
        }
    }
    n_accepted++;
    util_log(UTIL_LOG_INFO, "association_accepted", "assoc=%lu calling_ae=%s peer=%s", a->id,
             calling, peer.c_str());

    for (;;) {
        T_ASC_PresentationContextID pres_id = 0;
        T_DIMSE_Message msg;
        OFCondition c = DIMSE_receiveCommand(assoc, DIMSE_NONBLOCKING, cfg.dimse_timeout, &pres_id,
                                             &msg, nullptr);
        quickack(a->fd);
        if (c == DUL_PEERREQUESTEDRELEASE) {
            ASC_acknowledgeRelease(assoc);
            break;
        }
        if (c == DUL_PEERABORTEDASSOCIATION) {
            end_reason = "peer_aborted";
            break;
        }
        if (c.bad()) {
            end_reason =
                a->expired ? "deadline" : (c == DIMSE_NODATAAVAILABLE ? "timeout" : "error");
            detail = cond_text(c);
            abort_now(assoc, a->fd);
            break;
        }
        if (msg.CommandField == DIMSE_C_ECHO_RQ) {
            c = DIMSE_sendEchoResponse(assoc, pres_id, &msg.msg.CEchoRQ, STATUS_Success, nullptr);
        } else if (msg.CommandField == DIMSE_C_STORE_RQ) {
            c = handle_store(a, pres_id, &msg.msg.CStoreRQ, &stored, &failed);
        } else {
            util_log(UTIL_LOG_WARN, "unsupported_command", "assoc=%lu command=0x%04x", a->id,
                     (unsigned)msg.CommandField);
            c = DIMSE_BADCOMMANDTYPE;
        }
        if (c == DUL_PEERABORTEDASSOCIATION) { // in the middle of a dataset: nothing to abort
            end_reason = "peer_aborted";
            break;
        }
        if (c.bad()) {
            end_reason = a->expired ? "deadline" : "error";
            detail = cond_text(c);
            abort_now(assoc, a->fd);
            break;
        }
    }
    util_log(detail.empty() ? UTIL_LOG_INFO : UTIL_LOG_WARN, "association_ended",
             "assoc=%lu calling_ae=%s stored=%u failed=%u ms=%ld reason=%s%s%s%s", a->id, calling,
             stored, failed,
             (long)std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count(),
             end_reason, detail.empty() ? "" : " detail=\"", detail.c_str(),
             detail.empty() ? "" : "\"");
done:
    int fd;
    {
        // From here on the deadline checker and stop() leave the socket alone.
        std::lock_guard<std::mutex> g(mu);
        fd = a->fd;
        a->fd = -1;
    }
    // Not under mu: after our last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP) dcmtk
    // waits up to 3 minutes for the peer to close the connection, and a peer
    // that never does held mu all that time, so the listener stopped
    // accepting and every other association stalled (tests/robust/
    // test_abuse.py, the flood). Shutting our side first ends that wait at
    // once; what we sent still reaches the peer before the FIN.
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
    ASC_dropSCPAssociation(assoc);
    ASC_destroyAssociation(&assoc);
    {
        std::lock_guard<std::mutex> g(mu);
        a->assoc = nullptr;
    }
    a->finished = true;
}

void scp_server::check_deadlines()
{
    auto now = Clock::now();
    std::lock_guard<std::mutex> g(mu);
    for (Assoc *a : assocs) {
        if (a->tls_guard >= 0) {
            if (!a->tls_cut && now >= a->tls_until) {
                a->tls_cut = true;
                util_log(UTIL_LOG_WARN, "association_failed",
                         "assoc=%lu tls=1 reason=no_handshake_and_request_within_%ds", a->id,
                         std::min(cfg.acse_timeout, TLS_ACCEPT_S));
                shutdown(a->tls_guard, SHUT_RDWR);
            }
            continue;
        }
        if (!a->finished && !a->expired && a->fd >= 0 && now >= a->deadline) {
            a->expired = true;
            util_log(UTIL_LOG_WARN, "association_deadline", "assoc=%lu seconds=%d", a->id,
                     cfg.association_deadline);
            shutdown(a->fd, SHUT_RDWR);
        }
    }
}

void scp_server::reap(bool all)
{
    std::list<Assoc *> done;
    {
        std::lock_guard<std::mutex> g(mu);
        for (auto it = assocs.begin(); it != assocs.end();) {
            if (all || (*it)->finished) {
                done.push_back(*it);
                it = assocs.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (Assoc *a : done) {
        if (a->thread.joinable()) a->thread.join();
        delete a;
    }
}

size_t scp_server::count_locked(Counted which)
{
    size_t n = 0;
    for (Assoc *a : assocs)
        if (!a->finished &&
            (which == Counted::ALL || a->associated == (which == Counted::ASSOCIATED)) &&
            (which != Counted::WAITING || !a->tls) && (which != Counted::TLS_WAITING || a->tls))
            n++;
    return n;
}

size_t scp_server::count(Counted which)
{
    std::lock_guard<std::mutex> g(mu);
    return count_locked(which);
}

// Counts the associations and, under the limit, marks a as one of them in
// the same step under mu: counted apart, requests read at the same moment
// all saw busy == limit - 1 and all passed.
bool scp_server::claim_slot(Assoc *a, size_t *busy)
{
    std::lock_guard<std::mutex> g(mu);
    *busy = count_locked(Counted::ASSOCIATED);
    if (stopping || *busy >= (size_t)cfg.max_associations) return false;
    a->associated = true;
    return true;
}

// Starts a connection's thread, whose first job is to read the request
// (plain: receive_request; TLS: receive_tls_request, handshake first). The
// thread is stored in a before a is on assocs, under mu: the TLS listener
// calls this while the plain one reaps, and a reaper that found a finished
// association whose thread had not been stored yet skipped the join and
// deleted it under the TLS listener's assignment (ThreadSanitizer).
void scp_server::add_assoc(int fd, bool tls)
{
    Assoc *a = new Assoc;
    a->tls = tls;
    if (tls) {
        a->tls_raw = fd;
        a->tls_guard = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        a->tls_until =
            Clock::now() + std::chrono::seconds(std::min(cfg.acse_timeout, TLS_ACCEPT_S));
    } else {
        a->fd = fd;
    }
    a->deadline = Clock::now() + std::chrono::seconds(cfg.association_deadline);
    std::lock_guard<std::mutex> g(mu);
    a->id = next_id++;
    const char *why = tls && a->tls_guard < 0 ? strerror(errno) : nullptr;
    if (!why) {
        try {
            a->thread = std::thread([this, a] { run_assoc(a); });
        } catch (const std::exception &e) {
            why = e.what();
        }
    }
    if (why) {
        util_log(UTIL_LOG_ERROR, "connection_refused", "reason=\"cannot start thread: %s\"", why);
        if (a->tls_guard >= 0) close(a->tls_guard);
        close(fd);
        delete a;
        return;
    }
    assocs.push_back(a);
}

// A TLS connection's handshake and A-ASSOCIATE-RQ, in dcmtk, on the
// connection's own thread: several at once, so a peer that trickles its
// handshake holds up no other (they had been one at a time on the TLS
// listener, each up to TLS_ACCEPT_S). accept_mu only until dcmtk has taken
// the socket (TlsAcceptLayer), so plain associations go on meanwhile. Each
// read is bounded by socket timeouts set on the listening socket (inherited
// by accepted ones), and the whole of it by check_deadlines, which cuts a
// connection still at it after TLS_ACCEPT_S (or the ACSE timeout) through
// tls_guard: a peer that trickles its handshake a byte every few seconds
// had held up every new TLS association, and the node's stop.
bool scp_server::receive_tls_request(Assoc *a)
{
    int fd = a->tls_raw;
    T_ASC_Association *assoc = nullptr;
    OFCondition c;
    {
        std::unique_lock<std::mutex> held(accept_mu); // let go in createConnection
        dcmExternalSocketHandle.set(fd);
        t_socket_taken = false;
        t_accept_lock = &held;
        c = ASC_receiveAssociation(tls_net, &assoc, cfg.max_pdu, nullptr, nullptr, OFTrue,
                                   DUL_BLOCK, cfg.acse_timeout);
        t_accept_lock = nullptr;
        if (held.owns_lock()) dcmExternalSocketHandle.set(-1); // failed before it took fd
    }
    std::lock_guard<std::mutex> g(mu);
    close(a->tls_guard);
    a->tls_guard = -1;
    a->tls_raw = -1;
    // Once taken, dcmtk closes it with the association (or at a failed
    // handshake); before, it is left to us (t_socket_taken).
    if (c.bad() && !t_socket_taken) close(fd);
    if (c.bad()) {
        if (c != DUL_NOASSOCIATIONREQUEST) {
            n_conn_failed++;
            util_log(UTIL_LOG_WARN, "association_failed", "assoc=%lu tls=1 reason=\"%s\"", a->id,
                     cond_text(c).c_str());
        }
        if (assoc) {
            ASC_dropAssociation(assoc);
            ASC_destroyAssociation(&assoc);
        }
        return false;
    }
    a->fd = fd; /* dcmtk's now, closed with the association */
    a->assoc = assoc;
    return true;
}

// The TLS listener only accepts: each connection's handshake and request
// are read on its own thread (receive_tls_request).
void scp_server::tls_listen_loop()
{
    int lfd = (int)DUL_networkSocket(tls_net->network);
    while (!stopping) {
        struct pollfd pfd = {lfd, POLLIN, 0};
        if (poll(&pfd, 1, 500) <= 0) continue;
        if (count(Counted::TLS_WAITING) >= 2 * (size_t)cfg.max_associations) {
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
            continue;
        }
        int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        add_assoc(fd, true);
    }
    shutdown(lfd, SHUT_RDWR);
}

int scp_server::start_tls(char *err, size_t errlen)
{
    if (tls_cert.empty() || tls_key.empty()) {
        snprintf(err, errlen, "dicom.tls_port is set: dicom.tls_cert and dicom.tls_key are needed");
        return -1;
    }
    tls_layer = new TlsAcceptLayer;
    OFCondition c = tls_layer->setTLSProfile(TSP_Profile_BCP195);
    if (c.good()) c = tls_layer->activateCipherSuites();
    if (c.good()) c = tls_layer->setPrivateKeyFile(tls_key.c_str(), DCF_Filetype_PEM);
    if (c.bad()) {
        snprintf(err, errlen, "TLS key %s: %s", tls_key.c_str(), c.text());
        return -1;
    }
    c = tls_layer->setCertificateFile(tls_cert.c_str(), DCF_Filetype_PEM);
    if (c.bad()) {
        snprintf(err, errlen, "TLS certificate %s: %s", tls_cert.c_str(), c.text());
        return -1;
    }
    if (!tls_layer->checkPrivateKeyMatchesCertificate()) {
        snprintf(err, errlen, "TLS key %s does not match certificate %s", tls_key.c_str(),
                 tls_cert.c_str());
        return -1;
    }
    if (!tls_ca.empty()) {
        // A CA configured: peers must present a certificate it signed.
        c = tls_layer->addTrustedCertificateFile(tls_ca.c_str(), DCF_Filetype_PEM);
        if (c.bad()) {
            snprintf(err, errlen, "TLS CA %s: %s", tls_ca.c_str(), c.text());
            return -1;
        }
        tls_layer->setCertificateVerification(DCV_requireCertificate);
    } else {
        tls_layer->setCertificateVerification(DCV_ignoreCertificate);
    }
    c = ASC_initializeNetwork(NET_ACCEPTOR, cfg.tls_port, cfg.acse_timeout, &tls_net);
    if (c.good()) c = ASC_setTransportLayer(tls_net, tls_layer, 0);
    if (c.bad()) {
        snprintf(err, errlen, "cannot listen on DICOM TLS port %d: %s", cfg.tls_port,
                 cond_text(c).c_str());
        return -1;
    }
    int lfd = (int)DUL_networkSocket(tls_net->network);
    util_set_cloexec(lfd); // see scp_server_start
    struct timeval tv = {std::min(cfg.acse_timeout, 5), 0};
    setsockopt(lfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(lfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    tls_listener = std::thread([this] { tls_listen_loop(); });
    return 0;
}

// The listener only accepts TCP connections: reading the A-ASSOCIATE-RQ is
// the connection's own thread's job, so a peer that connects and says
// nothing holds up no one else.
void scp_server::listen_loop()
{
    int lfd = (int)DUL_networkSocket(net->network);
    while (!stopping) {
        reap(false);
        check_deadlines();
        struct pollfd pfd = {lfd, POLLIN, 0};
        if (poll(&pfd, 1, 500) <= 0) continue;
        sockaddr_storage from;
        socklen_t len = sizeof from;
        int fd = accept4(lfd, (sockaddr *)&from, &len, SOCK_CLOEXEC);
        if (fd < 0) continue;
        // Connections still waiting for their request have a cap of their
        // own, so silent peers cannot exhaust threads either; associations
        // do not count against it (they did, and at the limit a new peer
        // was cut off instead of being told A-ASSOCIATE-RJ).
        if (count(Counted::WAITING) >= 2 * (size_t)cfg.max_associations) {
            util_log(UTIL_LOG_WARN, "connection_refused", "reason=too_many_connections limit=%d",
                     2 * cfg.max_associations);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        add_assoc(fd, false);
    }
    // Refuse new connections from here on.
    shutdown(lfd, SHUT_RDWR);
}

extern "C" int scp_server_start(struct scp_server **out, const struct scp_server_config *cfg,
                                char *err, size_t errlen)
{
    *out = nullptr;
    scp_server *s = nullptr;
    try {
        s = new scp_server;
        s->cfg = *cfg;
        s->aetitle = cfg->aetitle;
        s->tmp_dir = cfg->tmp_dir;
        s->cfg.aetitle = s->aetitle.c_str();
        s->cfg.tmp_dir = s->tmp_dir.c_str();
        s->cfg.allowed_peers = nullptr;
        if (parse_peers(cfg->allowed_peers, &s->peers, err, errlen) != 0) {
            delete s;
            return -1;
        }
        // dcmtk reads the PDU size and its own timeouts from globals set here.
        dcmMaxOutgoingPDUSize.set((Uint32)cfg->max_pdu);
        dcmConnectionTimeout.set(cfg->acse_timeout);
        // Peers are known by address: no reverse DNS lookup (it can stall an
        // association for seconds, and the allowlist compares addresses).
        dcmDisableGethostbyaddr.set(OFTrue);
        OFCondition c = ASC_initializeNetwork(NET_ACCEPTOR, cfg->port, cfg->acse_timeout, &s->net);
        if (c.bad()) {
            snprintf(err, errlen, "cannot listen on DICOM port %d: %s", cfg->port,
                     cond_text(c).c_str());
            delete s;
            return -1;
        }
        // dcmtk opens it without close-on-exec: the webhook's curl kept it,
        // and after a kill -9 the node could not listen again until curl
        // ended, while the kernel queued scanners' connections on it. The
        // sockets accepted from it are made close-on-exec (accept4).
        util_set_cloexec((int)DUL_networkSocket(s->net->network));
        ASC_setTransportLayer(s->net, new PlainAcceptLayer, 1); // dcmtk's to delete
        if (cfg->tls_port > 0) {
            s->tls_cert = cfg->tls_cert ? cfg->tls_cert : "";
            s->tls_key = cfg->tls_key ? cfg->tls_key : "";
            s->tls_ca = cfg->tls_ca ? cfg->tls_ca : "";
            if (s->start_tls(err, errlen) != 0) {
                if (s->tls_net) ASC_dropNetwork(&s->tls_net);
                delete s->tls_layer;
                ASC_dropNetwork(&s->net);
                delete s;
                return -1;
            }
        }
        s->listener = std::thread([s] { s->listen_loop(); });
    } catch (const std::exception &e) {
        snprintf(err, errlen, "cannot start DICOM server: %s", e.what());
        if (s && s->net) ASC_dropNetwork(&s->net);
        delete s;
        return -1;
    }
    *out = s;
    return 0;
}

extern "C" int scp_server_set_allowed_peers(struct scp_server *s, const char *allowed, char *err,
                                            size_t errlen)
{
    try {
        std::vector<Peer> peers;
        if (parse_peers(allowed, &peers, err, errlen) != 0) return -1;
        std::lock_guard<std::mutex> g(s->mu);
        s->peers.swap(peers);
        return 0;
    } catch (const std::exception &e) {
        snprintf(err, errlen, "%s", e.what());
        return -1;
    }
}

extern "C" void scp_server_counters(struct scp_server *s, struct scp_counters *out)
{
    *out = scp_counters{};
    out->associations_accepted = s->n_accepted;
    out->rejected_called_ae = s->n_rej_called;
    out->rejected_calling_peer = s->n_rej_calling;
    out->rejected_limit = s->n_rej_limit;
    out->rejected_no_context = s->n_rej_context;
    out->connections_failed = s->n_conn_failed;
    out->stored = s->n_stored;
    for (int i = 0; i < SCP_REFUSED_NKINDS; i++)
        out->refused[i] = s->n_refused[i];
    out->incomplete = s->n_incomplete;
}

extern "C" const char *scp_refusal_name(enum scp_refusal r)
{
    static const char *const names[SCP_REFUSED_NKINDS] = {"none",
                                                          "low_space",
                                                          "disk_full",
                                                          "permission",
                                                          "io_error",
                                                          "database",
                                                          "too_large",
                                                          "does_not_match_sop_class",
                                                          "cannot_understand",
                                                          "uid_conflict",
                                                          "sop_class_not_supported"};
    return r >= 0 && r < SCP_REFUSED_NKINDS ? names[r] : "unknown";
}

extern "C" enum scp_refusal scp_refusal_from_errno(int err)
{
    switch (err) {
    case ENOSPC:
    case EDQUOT:
        return SCP_REFUSED_DISK_FULL;
    case EACCES:
    case EPERM:
    case EROFS:
        return SCP_REFUSED_PERMISSION;
    default:
        return SCP_REFUSED_IO;
    }
}

extern "C" int scp_refusal_is_local(enum scp_refusal r)
{
    return r >= SCP_REFUSED_LOW_SPACE && r <= SCP_REFUSED_DATABASE;
}

extern "C" int scp_server_active(struct scp_server *s)
{
    return (int)s->count(Counted::ALL);
}

extern "C" void scp_server_stop(struct scp_server *s, int grace_seconds)
{
    if (!s) return;
    s->stopping = true;
    if (s->listener.joinable()) s->listener.join();
    if (s->tls_listener.joinable()) s->tls_listener.join();
    {
        // TLS connections still in their handshake are not waited for
        std::lock_guard<std::mutex> g(s->mu);
        for (Assoc *a : s->assocs)
            if (a->tls_guard >= 0) shutdown(a->tls_guard, SHUT_RDWR);
    }
    auto until = Clock::now() + std::chrono::seconds(grace_seconds);
    while (scp_server_active(s) > 0 && Clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    {
        std::lock_guard<std::mutex> g(s->mu);
        for (Assoc *a : s->assocs) {
            if (!a->finished && a->fd >= 0) {
                util_log(UTIL_LOG_WARN, "association_aborted", "assoc=%lu reason=shutdown", a->id);
                shutdown(a->fd, SHUT_RDWR);
            }
        }
    }
    s->reap(true);
    ASC_dropNetwork(&s->net);
    if (s->tls_net) ASC_dropNetwork(&s->tls_net);
    delete s->tls_layer;
    delete s;
}
