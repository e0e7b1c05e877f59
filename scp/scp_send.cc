// scp/scp_send.cc: the C-STORE SCU (results to PACS) on dcmtk's DcmSCU.
// C API in scp_send.h; no exception leaves this file.
#include "scp_send.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/scu.h>
#include <dcmtk/dcmtls/tlslayer.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "io.h"

namespace
{

void set_err(char *err, size_t errlen, const std::string &msg)
{
    if (err && errlen > 0) std::snprintf(err, errlen, "%s", msg.c_str());
}

bool nonempty(const char *s)
{
    return s && *s;
}

// The SOP class and transfer syntax of a file, from its meta header only.
bool file_syntax(const char *path, std::string &sop_class, std::string &ts, std::string &why)
{
    DcmMetaInfo meta;
    OFCondition c = meta.loadFile(path);
    if (c.bad()) {
        why = std::string("cannot read ") + path + ": " + c.text();
        return false;
    }
    OFString cls, syn;
    meta.findAndGetOFString(DCM_MediaStorageSOPClassUID, cls);
    meta.findAndGetOFString(DCM_TransferSyntaxUID, syn);
    if (cls.empty() || syn.empty()) {
        why = std::string(path) + ": no SOP class or transfer syntax in the meta header";
        return false;
    }
    sop_class = cls.c_str();
    ts = syn.c_str();
    return true;
}

// dcmtk connects to PACS on a socket without close-on-exec, and a program
// the node started meanwhile (the webhook's curl) kept the connection open
// after the node had ended it or was gone. The socket is first ours when
// dcmtk asks the transport layer for the connection, right after the
// connect: these layers mark it there. DcmSCU takes a layer only through
// useSecureConnection(), which also marks the association secure; that
// mark is read by nothing but createConnection, so the plain layer makes a
// plain connection whatever it says.
//
// There too the send's cut (struct scp_send_cut) learns of the connection: it
// keeps a copy of the socket (guard), so that shutting it down from another
// thread always reaches this connection, even after dcmtk has closed its
// own descriptor and the number went to another file.
void watch(scp_send_cut *cut, int sock)
{
    if (!cut) return;
    pthread_mutex_lock(&cut->mu);
    if (cut->guard >= 0) close(cut->guard);
    cut->guard = fcntl(sock, F_DUPFD_CLOEXEC, 0);
    if (cut->cut) shutdown(sock, SHUT_RDWR);
    pthread_mutex_unlock(&cut->mu);
}

// After the send: the guard goes, and with it the connection if dcmtk has
// let go of it.
void unwatch(scp_send_cut *cut)
{
    if (!cut) return;
    pthread_mutex_lock(&cut->mu);
    if (cut->guard >= 0) close(cut->guard);
    cut->guard = -1;
    pthread_mutex_unlock(&cut->mu);
}

// Whether the send has been cut (a failure then is the caller's stop, not
// the peer's).
bool was_cut(scp_send_cut *cut)
{
    if (!cut) return false;
    pthread_mutex_lock(&cut->mu);
    bool was = cut->cut;
    pthread_mutex_unlock(&cut->mu);
    return was;
}

class PlainLayer : public DcmTransportLayer
{
  public:
    explicit PlainLayer(scp_send_cut *c) : cut(c) {}
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool) override
    {
        util_set_cloexec(sock);
        watch(cut, sock);
        return DcmTransportLayer::createConnection(sock, OFFalse);
    }

  private:
    scp_send_cut *cut;
};

class TlsLayer : public DcmTLSTransportLayer
{
  public:
    explicit TlsLayer(scp_send_cut *c)
        : DcmTLSTransportLayer(NET_REQUESTOR, nullptr, OFTrue), cut(c)
    {
    }
    DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override
    {
        util_set_cloexec(sock);
        watch(cut, sock);
        return DcmTLSTransportLayer::createConnection(sock, secure);
    }

  private:
    scp_send_cut *cut;
};

std::unique_ptr<DcmTLSTransportLayer> make_tls(const scp_send_dest *d, std::string &why)
{
    std::unique_ptr<DcmTLSTransportLayer> t(new TlsLayer(d->cut));
    OFCondition c = t->setTLSProfile(TSP_Profile_BCP195);
    if (c.good()) c = t->activateCipherSuites();
    if (c.bad()) {
        why = std::string("TLS setup: ") + c.text();
        return nullptr;
    }
    if (nonempty(d->tls_cert) || nonempty(d->tls_key)) {
        c = t->setPrivateKeyFile(nonempty(d->tls_key) ? d->tls_key : "", DCF_Filetype_PEM);
        if (c.good())
            c = t->setCertificateFile(nonempty(d->tls_cert) ? d->tls_cert : "", DCF_Filetype_PEM);
        if (c.bad()) {
            why = std::string("TLS client certificate or key: ") + c.text();
            return nullptr;
        }
    }
    if (nonempty(d->tls_ca)) {
        c = t->addTrustedCertificateFile(d->tls_ca, DCF_Filetype_PEM);
        if (c.bad()) {
            why = std::string("TLS CA ") + d->tls_ca + ": " + c.text();
            return nullptr;
        }
        t->setCertificateVerification(DCV_requireCertificate);
        // A certificate signed by the CA is not enough: it must be the one
        // for the host we dial (its DNS name, or its IP address in an IP
        // subjectAltName), else any certificate from that CA would do.
        X509_VERIFY_PARAM *param = SSL_CTX_get0_param(t->getNativeHandle());
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        unsigned char ip[16];
        bool is_ip = inet_pton(AF_INET, d->host, ip) == 1 || inet_pton(AF_INET6, d->host, ip) == 1;
        if ((is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, d->host)
                   : X509_VERIFY_PARAM_set1_host(param, d->host, 0)) != 1) {
            why = std::string("TLS: cannot check the certificate against host ") + d->host;
            return nullptr;
        }
    } else {
        t->setCertificateVerification(DCV_ignoreCertificate);
    }
    return t;
}

// useSecureConnection() is protected in dcmtk 3.6.7.
struct layered_scu : DcmSCU {
    using DcmSCU::useSecureConnection;
};

std::string hex_status(int s)
{
    char b[16];
    std::snprintf(b, sizeof b, "0x%04X", (unsigned)s);
    return b;
}

int send_files(const scp_send_dest *d, scp_send_file *files, int n, scp_send_go_on_fn go_on,
               scp_send_answered_fn answered, void *ud, char *err, size_t errlen)
{
    for (int i = 0; i < n; i++) {
        files[i].status = -1;
        std::snprintf(files[i].error, sizeof files[i].error, "not sent");
    }
    if (!nonempty(d->calling_aet) || !nonempty(d->called_aet) || !nonempty(d->host) ||
        d->port <= 0 || d->port > 65535 || n <= 0) {
        set_err(err, errlen, "scp_send_files: bad arguments");
        return -1;
    }
    // One presentation context per distinct SOP class and stored syntax.
    std::vector<std::string> cls(n), syn(n);
    std::vector<bool> readable(n, false);
    for (int i = 0; i < n; i++) {
        std::string why;
        readable[i] = file_syntax(files[i].path, cls[i], syn[i], why);
        if (!readable[i]) std::snprintf(files[i].error, sizeof files[i].error, "%s", why.c_str());
    }
    std::unique_ptr<DcmTransportLayer> layer; // outlives the SCU that borrows it
    layered_scu scu;
    scu.setAETitle(d->calling_aet);
    scu.setPeerAETitle(d->called_aet);
    scu.setPeerHostName(d->host);
    scu.setPeerPort((Uint16)d->port);
    int timeout = d->timeout_s > 0 ? d->timeout_s : 30;
    scu.setConnectionTimeout(timeout);
    scu.setACSETimeout((Uint32)timeout);
    scu.setDIMSETimeout((Uint32)timeout);
    scu.setDIMSEBlockingMode(DIMSE_NONBLOCKING);
    std::vector<std::pair<std::string, std::string>> proposed;
    for (int i = 0; i < n; i++) {
        if (!readable[i]) continue;
        auto key = std::make_pair(cls[i], syn[i]);
        bool seen = false;
        for (auto &p : proposed)
            seen = seen || p == key;
        if (seen) continue;
        proposed.push_back(key);
        OFList<OFString> ts;
        ts.push_back(syn[i].c_str());
        if (syn[i] != UID_LittleEndianExplicitTransferSyntax)
            ts.push_back(UID_LittleEndianExplicitTransferSyntax);
        if (syn[i] != UID_LittleEndianImplicitTransferSyntax)
            ts.push_back(UID_LittleEndianImplicitTransferSyntax);
        scu.addPresentationContext(cls[i].c_str(), ts);
    }
    if (proposed.empty()) {
        set_err(err, errlen, "no readable file to send");
        return 0; // nothing to associate for; every file carries its reason
    }
    OFCondition c = scu.initNetwork();
    if (c.bad()) {
        set_err(err, errlen, std::string("network: ") + c.text());
        return -1;
    }
    if (d->tls) {
        std::string why;
        layer = make_tls(d, why);
        if (!layer) {
            set_err(err, errlen, why);
            return -1;
        }
    } else {
        layer.reset(new PlainLayer(d->cut));
    }
    // Only once the network exists (initNetwork), else dcmtk refuses it.
    c = scu.useSecureConnection(layer.get());
    if (c.bad()) {
        set_err(err, errlen, std::string(d->tls ? "TLS: " : "network: ") + c.text());
        return -1;
    }
    c = scu.negotiateAssociation();
    if (c.bad() && was_cut(d->cut)) {
        for (int i = 0; i < n; i++) {
            if (!readable[i]) continue;
            files[i].status = SCP_SEND_STOPPED;
            std::snprintf(files[i].error, sizeof files[i].error, "not sent: stopped");
        }
    }
    if (c.bad()) {
        set_err(err, errlen,
                std::string("association to ") + d->called_aet + "@" + d->host + ":" +
                    std::to_string(d->port) + " failed: " + c.text());
        return -1;
    }
    bool broken = false, halted = false;
    for (int i = 0; i < n; i++) {
        if (!readable[i]) continue;
        // Asked before the first file too: a stop that came while the
        // association was being set up sends nothing on it.
        if (!halted && !broken && go_on && !go_on(ud)) halted = true;
        if (halted) {
            files[i].status = SCP_SEND_STOPPED;
            std::snprintf(files[i].error, sizeof files[i].error, "not sent: stopped");
            continue;
        }
        if (broken) {
            files[i].status = SCP_SEND_UNSENT;
            std::snprintf(files[i].error, sizeof files[i].error,
                          "not sent: the association ended after an earlier object failed");
            continue;
        }
        T_ASC_PresentationContextID pc = scu.findAnyPresentationContextID(cls[i].c_str(), "");
        if (pc == 0) {
            std::snprintf(files[i].error, sizeof files[i].error,
                          "the peer accepted no presentation context for SOP class %s",
                          cls[i].c_str());
            continue;
        }
        Uint16 status = 0;
        c = scu.sendSTORERequest(pc, files[i].path, nullptr, status);
        if (c.bad()) {
            std::snprintf(files[i].error, sizeof files[i].error, "C-STORE: %s", c.text());
            // No answer in time, or a broken one: a late answer may still come,
            // and dcmtk would take it for the answer to the next request on
            // this association. So none goes on it: the rest wait for a new one.
            // One the peer aborted is gone: dropped, not aborted again.
            if (c == DUL_PEERABORTEDASSOCIATION)
                scu.closeAssociation(DCMSCU_PEER_ABORTED_ASSOCIATION);
            else if (scu.isConnected())
                scu.abortAssociation();
            if (was_cut(d->cut)) { // the caller's stop: it and the rest go after it
                files[i].status = SCP_SEND_STOPPED;
                std::snprintf(files[i].error, sizeof files[i].error, "not answered: stopped");
                halted = true;
            } else {
                broken = true;
            }
            continue;
        }
        files[i].status = status;
        if (scp_send_status_ok(status))
            files[i].error[0] = '\0';
        else
            std::snprintf(files[i].error, sizeof files[i].error, "C-STORE status %s",
                          hex_status(status).c_str());
        if (answered) answered(ud, i, &files[i]);
    }
    if (scu.isConnected()) scu.releaseAssociation();
    return 0;
}

} // namespace

extern "C" bool scp_send_status_ok(int status)
{
    // PS3.7 C.1.2: any Bxxx, and 0001, 0107, 0116, are warnings, the object
    // stored. Taken for failures, each was sent again, so PACS got it
    // pacs.max_attempts times and the node then called it given up.
    return status >= 0 && status <= 0xFFFF &&
           (status == STATUS_Success || DICOM_WARNING_STATUS(status));
}

extern "C" void scp_send_cut_init(struct scp_send_cut *c)
{
    pthread_mutex_init(&c->mu, nullptr);
    c->guard = -1;
    c->cut = false;
}

extern "C" void scp_send_cut_destroy(struct scp_send_cut *c)
{
    if (c->guard >= 0) close(c->guard);
    c->guard = -1;
    pthread_mutex_destroy(&c->mu);
}

extern "C" void scp_send_cut_short(struct scp_send_cut *c)
{
    pthread_mutex_lock(&c->mu);
    c->cut = true;
    if (c->guard >= 0) shutdown(c->guard, SHUT_RDWR);
    pthread_mutex_unlock(&c->mu);
}

extern "C" int scp_send_files(const struct scp_send_dest *dest, struct scp_send_file *files, int n,
                              scp_send_go_on_fn go_on, scp_send_answered_fn answered, void *ud,
                              char *err, size_t errlen)
{
    int rc = -1;
    try {
        if (!dest || (!files && n > 0)) {
            set_err(err, errlen, "scp_send_files: bad arguments");
            return -1;
        }
        rc = send_files(dest, files, n, go_on, answered, ud, err, errlen);
    } catch (const std::exception &e) {
        set_err(err, errlen, std::string("scp_send_files: ") + e.what());
    } catch (...) {
        set_err(err, errlen, "scp_send_files: unknown exception");
    }
    if (dest) unwatch(dest->cut); /* the copy of the socket goes too */
    return rc;
}
