// Command pstest serves Google's in-memory Pub/Sub fake
// (cloud.google.com/go/pubsub/pstest) as a standalone gRPC server, so that the
// Rust tests can point PUBSUB_EMULATOR_HOST at it.
//
// It is a Go module of its own, pinned to cloud.google.com/go/pubsub/v2 (go.mod), and
// built from the Go module proxy by the test support (gar_testsupport::gotool):
//
//	cd testsupport/pstest && CGO_ENABLED=0 go build -trimpath -o /tmp/pstest .
//
// Usage:
//
//	pstest -addr 127.0.0.1:8085 -project p -topic t -subscription s=t
//
// Once the listener is bound and the topics/subscriptions exist, exactly one
// line "READY <host:port>" is written to stdout (nothing else is ever written
// there); logs go to stderr. With -addr 127.0.0.1:0 the kernel picks the port
// and the READY line reports it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

var verbose bool

func main() {
	var (
		addr           = flag.String("addr", "127.0.0.1:8085", "listen address (port 0 = pick a free port, reported on the READY line)")
		project        = flag.String("project", "p", "project used to qualify short topic/subscription names")
		ackDeadline    = flag.Int("ack-deadline", 10, "ack deadline in seconds for the subscriptions created by -subscription")
		minAckDeadline = flag.Duration("min-ack-deadline", 10*time.Second, "smallest ack deadline accepted (pstest default 10s, must be >= 1s)")
		streamTimeout  = flag.Duration("stream-timeout", 0, "close StreamingPull streams after this long (0 = never), like the real service does after ~30m")
		bindRetry      = flag.Duration("bind-retry", 5*time.Second, "keep retrying to bind a fixed port that is still in use for this long")
		stdinEOF       = flag.Bool("exit-on-stdin-eof", false, "exit when stdin is closed (lets a launcher tie our lifetime to its own)")
		topics         listFlag
		subs           listFlag
	)
	flag.Var(&topics, "topic", "topic to create at start: NAME or projects/P/topics/NAME (repeatable)")
	flag.Var(&subs, "subscription", "subscription to create at start: NAME=TOPIC[,dead-letter=TOPIC:MAX_DELIVERY_ATTEMPTS] (repeatable); topics are created if missing. "+
		"With a dead-letter policy the fake counts deliveries and sets delivery_attempt, as Pub/Sub does")
	flag.BoolVar(&verbose, "v", false, "log every RPC to stderr")
	flag.Parse()
	if flag.NArg() > 0 {
		fatalf("unexpected arguments: %q", flag.Args())
	}
	log.SetOutput(os.Stderr)
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("pstest: ")

	if *minAckDeadline < time.Second {
		fatalf("-min-ack-deadline must be >= 1s, got %v", *minAckDeadline)
	}
	pstest.SetMinAckDeadline(*minAckDeadline)

	// pstest.NewServer also serves the fake on its own random localhost port.
	// We leave that listener alone (stopping it only produces log noise) and
	// serve the very same GServer, i.e. the same state, on our address.
	fake := pstest.NewServer()
	if *streamTimeout > 0 {
		fake.SetStreamTimeout(*streamTimeout)
	}
	svc := &service{GServer: &fake.GServer, fake: fake}

	ctx := context.Background()
	for _, t := range topics {
		name := qualify(*project, "topics", t)
		if _, err := svc.CreateTopic(ctx, &pb.Topic{Name: name}); err != nil && status.Code(err) != codes.AlreadyExists {
			fatalf("create topic %s: %v", name, err)
		}
		log.Printf("created topic %s", name)
	}
	for _, s := range subs {
		spec, err := parseSubscription(*project, s)
		if err != nil {
			fatalf("-subscription wants NAME=TOPIC[,dead-letter=TOPIC:MAX_DELIVERY_ATTEMPTS], got %q: %v", s, err)
		}
		for _, topic := range []string{spec.topic, spec.deadLetterTopic} {
			if topic == "" {
				continue
			}
			if _, err := svc.CreateTopic(ctx, &pb.Topic{Name: topic}); err != nil && status.Code(err) != codes.AlreadyExists {
				fatalf("create topic %s: %v", topic, err)
			}
		}
		sub := &pb.Subscription{
			Name:               spec.name,
			Topic:              spec.topic,
			AckDeadlineSeconds: int32(*ackDeadline),
		}
		if spec.deadLetterTopic != "" {
			sub.DeadLetterPolicy = &pb.DeadLetterPolicy{
				DeadLetterTopic:     spec.deadLetterTopic,
				MaxDeliveryAttempts: spec.maxDeliveryAttempts,
			}
		}
		if _, err := svc.CreateSubscription(ctx, sub); err != nil {
			fatalf("create subscription %s: %v", spec.name, err)
		}
		if spec.deadLetterTopic != "" {
			log.Printf("created subscription %s -> %s (ack deadline %ds, dead letters to %s after %d deliveries)",
				spec.name, spec.topic, *ackDeadline, spec.deadLetterTopic, spec.maxDeliveryAttempts)
		} else {
			log.Printf("created subscription %s -> %s (ack deadline %ds)", spec.name, spec.topic, *ackDeadline)
		}
	}

	lis, err := listen(*addr, *bindRetry)
	if err != nil {
		fatalf("listen %s: %v", *addr, err)
	}
	g := grpc.NewServer(
		grpc.UnaryInterceptor(unaryInterceptor),
		grpc.StreamInterceptor(streamInterceptor),
		// grpc-go's default policy answers client keepalive pings sent more
		// often than every 5 minutes with GOAWAY(too_many_pings), killing
		// long-lived StreamingPulls; the real service tolerates them.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             time.Second,
			PermitWithoutStream: true,
		}),
		// The real service accepts publish requests up to 10 MB; grpc-go's
		// default limit is 4 MB.
		grpc.MaxRecvMsgSize(16<<20),
	)
	pb.RegisterPublisherServer(g, svc)
	pb.RegisterSubscriberServer(g, svc)

	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-sigc
		log.Printf("received %v, shutting down", sig)
		g.Stop() // not GracefulStop: open StreamingPull streams never end by themselves
		os.Exit(0)
	}()
	if *stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			log.Printf("stdin closed, shutting down")
			g.Stop()
			os.Exit(0)
		}()
	}

	log.Printf("serving on %s (project %s)", lis.Addr(), *project)
	// The only thing ever written to stdout.
	fmt.Printf("READY %s\n", lis.Addr())
	if err := g.Serve(lis); err != nil {
		fatalf("serve: %v", err)
	}
}

func fatalf(format string, args ...any) {
	log.Printf(format, args...)
	os.Exit(2)
}

// qualify turns "NAME" into "projects/<project>/<kind>/NAME"; names that
// already contain a '/' are taken as full resource names.
func qualify(project, kind, name string) string {
	if strings.Contains(name, "/") {
		return name
	}
	return fmt.Sprintf("projects/%s/%s/%s", project, kind, name)
}

type subscriptionSpec struct {
	name, topic         string
	deadLetterTopic     string
	maxDeliveryAttempts int32
}

// parseSubscription reads NAME=TOPIC[,dead-letter=TOPIC:N].
func parseSubscription(project, s string) (subscriptionSpec, error) {
	head, policy, hasPolicy := strings.Cut(s, ",")
	name, topic, ok := strings.Cut(head, "=")
	if !ok || name == "" || topic == "" {
		return subscriptionSpec{}, errors.New("want NAME=TOPIC[,dead-letter=TOPIC:MAX_DELIVERY_ATTEMPTS]")
	}
	spec := subscriptionSpec{
		name:  qualify(project, "subscriptions", name),
		topic: qualify(project, "topics", topic),
	}
	if !hasPolicy {
		return spec, nil
	}
	value, ok := strings.CutPrefix(policy, "dead-letter=")
	if !ok {
		return subscriptionSpec{}, fmt.Errorf("unknown option %q (only dead-letter=TOPIC:N)", policy)
	}
	dlq, max, ok := strings.Cut(value, ":")
	n, err := strconv.Atoi(max)
	// Pub/Sub's own bounds for max_delivery_attempts.
	if !ok || dlq == "" || err != nil || n < 5 || n > 100 {
		return subscriptionSpec{}, fmt.Errorf("dead-letter wants TOPIC:N with 5 <= N <= 100, got %q", value)
	}
	spec.deadLetterTopic = qualify(project, "topics", dlq)
	spec.maxDeliveryAttempts = int32(n)
	return spec, nil
}

// listen binds addr, retrying for a while if a fixed port is still in use
// (restart-on-the-same-port tests kill the previous instance just before).
func listen(addr string, retry time.Duration) (net.Listener, error) {
	deadline := time.Now().Add(retry)
	for {
		lis, err := net.Listen("tcp", addr)
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return lis, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// service is pstest's GServer with its one remaining sharp edge filed off: a
// StreamingPull request that would make pstest panic is rejected first. (The v2
// fake ignores unknown ack ids and answers UNIMPLEMENTED for what it lacks, which
// the Debian v0.56 copy did not.)
type service struct {
	*pstest.GServer
	fake *pstest.Server
}

// StreamingPull: pstest indexes ModifyDeadlineSeconds with the position in
// ModifyDeadlineAckIds in a goroutine, so mismatched lengths would crash the
// process; reject such requests like the real service does.
func (s *service) StreamingPull(stream pb.Subscriber_StreamingPullServer) error {
	return s.GServer.StreamingPull(checkedStream{stream})
}

type checkedStream struct {
	pb.Subscriber_StreamingPullServer
}

func (c checkedStream) Recv() (*pb.StreamingPullRequest, error) {
	req, err := c.Subscriber_StreamingPullServer.Recv()
	if err != nil {
		return nil, err
	}
	if len(req.ModifyDeadlineAckIds) != len(req.ModifyDeadlineSeconds) {
		return nil, status.Errorf(codes.InvalidArgument,
			"modify_deadline_ack_ids has %d entries but modify_deadline_seconds has %d",
			len(req.ModifyDeadlineAckIds), len(req.ModifyDeadlineSeconds))
	}
	return req, nil
}

// The interceptors log RPCs with -v and turn any remaining panic inside a
// handler into an INTERNAL error instead of killing the emulator.
func unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			log.Printf("PANIC in %s: %v\n%s", info.FullMethod, r, debug.Stack())
			err = status.Errorf(codes.Internal, "pstest panicked: %v", r)
		}
	}()
	resp, err = handler(ctx, req)
	if verbose {
		log.Printf("%s %s", info.FullMethod, statusText(err))
	}
	return resp, err
}

func streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			log.Printf("PANIC in %s: %v\n%s", info.FullMethod, r, debug.Stack())
			err = status.Errorf(codes.Internal, "pstest panicked: %v", r)
		}
	}()
	if verbose {
		log.Printf("%s stream opened", info.FullMethod)
	}
	err = handler(srv, ss)
	if verbose {
		log.Printf("%s stream closed: %s", info.FullMethod, statusText(err))
	}
	return err
}

func statusText(err error) string {
	if err == nil {
		return "OK"
	}
	return status.Convert(err).Code().String() + ": " + status.Convert(err).Message()
}
