-- The todo-chatbot database: schema and data, run as the owner role `todo`
-- into a freshly created database on every sandbox start.
-- setseed makes the "random" data the same on every start.
SELECT setseed(0.42);

CREATE TABLE users (
    id         bigserial PRIMARY KEY,
    email      text NOT NULL UNIQUE,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id           bigserial PRIMARY KEY,
    user_id      bigint REFERENCES users (id),  -- nullable: restores check for orphans
    title        text NOT NULL,
    description  text,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'in_progress', 'completed', 'cancelled')),
    priority     text NOT NULL DEFAULT 'medium' CHECK (priority IN ('low', 'medium', 'high')),
    due_date     timestamptz,
    recurrence   text NOT NULL DEFAULT 'none'
                 CHECK (recurrence IN ('none', 'daily', 'weekly', 'monthly')),
    reminder_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);
CREATE INDEX tasks_user_id_idx ON tasks (user_id);
CREATE INDEX tasks_due_date_idx ON tasks (due_date);
CREATE INDEX tasks_status_idx ON tasks (status);

-- Immutable history of task changes; integrity checks look for gaps in sequence_number.
CREATE TABLE audit_log (
    sequence_number bigint PRIMARY KEY,
    task_id         bigint NOT NULL,
    user_id         bigint,
    action          text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE SEQUENCE audit_log_sequence_number_seq OWNED BY audit_log.sequence_number;
ALTER TABLE audit_log ALTER COLUMN sequence_number SET DEFAULT nextval('audit_log_sequence_number_seq');

-- Agent checkpoints; the maintenance runbook deletes those older than 30 days.
CREATE TABLE checkpoints (
    thread_id     text NOT NULL,
    checkpoint_id text NOT NULL,
    parent_id     text,
    checkpoint    jsonb NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (thread_id, checkpoint_id)
);
CREATE INDEX checkpoints_created_at_idx ON checkpoints (created_at);

INSERT INTO users (email, name, created_at)
SELECT 'user' || i || '@example.com', 'User ' || i, now() - (i || ' days')::interval
FROM generate_series(1, 50) AS i;

INSERT INTO tasks (user_id, title, description, status, priority, due_date, recurrence,
                   reminder_at, created_at, updated_at, completed_at)
SELECT 1 + i % 50,
       'Task ' || i,
       'Seeded task number ' || i,
       (ARRAY['pending', 'in_progress', 'completed', 'cancelled'])[1 + i % 4],
       (ARRAY['low', 'medium', 'high'])[1 + i % 3],
       now() + ((i % 60) - 20 || ' days')::interval,
       (ARRAY['none', 'none', 'daily', 'weekly', 'monthly'])[1 + i % 5],
       CASE WHEN i % 3 = 0 THEN now() + ((i % 60) - 21 || ' days')::interval END,
       now() - ((i % 90) || ' days')::interval,
       now() - ((i % 30) || ' days')::interval,
       CASE WHEN i % 4 = 2 THEN now() - ((i % 30) || ' days')::interval END
FROM generate_series(1, 3000) AS i;

INSERT INTO audit_log (task_id, user_id, action, payload, created_at)
SELECT 1 + i % 3000, 1 + i % 50,
       (ARRAY['task.created', 'task.updated', 'task.completed', 'task.deleted'])[1 + i % 4],
       jsonb_build_object('task_id', 1 + i % 3000, 'source', 'backend'),
       now() - ((6000 - i) || ' minutes')::interval
FROM generate_series(1, 6000) AS i
ORDER BY i;

INSERT INTO checkpoints (thread_id, checkpoint_id, parent_id, checkpoint, metadata, created_at)
SELECT 'thread-' || (1 + i % 40),
       'ckpt-' || i,
       CASE WHEN i > 40 THEN 'ckpt-' || (i - 40) END,
       jsonb_build_object('v', 1, 'step', i, 'channel_values', jsonb_build_object('messages', i % 7)),
       jsonb_build_object('source', 'loop', 'writes', random() > 0.5),
       now() - (i * interval '1 hour')
FROM generate_series(1, 2000) AS i;

ANALYZE users, tasks, audit_log, checkpoints;
